"""The evaluation report: a versioned pydantic schema (``report.json``), in the style of SAEBench's outputs."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

REPORT_SCHEMA_VERSION = "rsae-report/3"
"""3: ``SAEMetrics.delta_ce_se`` and ``Report.comparisons`` (paired delta CE differences with standard errors)."""


class SAEMetrics(BaseModel):
    """Held-out metrics of one SAE. Units: MSE in squared residual units per token; CE, KL in nats/token.

    ``fvu`` is pooled about the per-dimension mean; ``fvu_about_zero`` divides by sum x^2 instead.
    Downstream fields are None when CE evaluation was disabled.
    """

    model_config = ConfigDict(extra="forbid")
    mse: float
    fvu: float
    fvu_about_zero: float
    l0: float
    alive_fraction: float
    n_tokens: int
    ce_clean: float | None = None
    ce_spliced: float | None = None
    ce_zero: float | None = None
    delta_ce: float | None = None
    delta_ce_se: float | None = Field(
        None, description="Standard error of delta CE, clustered by held-out sequence (nats/token).")
    loss_recovered: float | None = None
    kl: float | None = None
    ce_tokens: int | None = None
    probe_accuracy: dict[str, float] | None = Field(
        None, description="k -> mean balanced accuracy of k-sparse one-vs-rest probes on the BBC categories.")


class Report(BaseModel):
    """Content of ``report.json``. ``metrics`` keys: ``teacher``, ``rsae_init`` (after calibration),
    ``rsae`` (after fine-tuning) and ``control`` (the teacher fine-tuned with its own gate on the same data,
    steps and objective). ``headline`` flattens the numbers a job listing shows. ``plots`` holds the data
    of the HTML report's figures (gate curves, pre-activation histogram)."""

    model_config = ConfigDict(extra="forbid")
    schema_version: str = Field(REPORT_SCHEMA_VERSION)
    created_at: str
    config: dict[str, Any]
    host_model: dict[str, Any]
    teacher: dict[str, Any]
    data: dict[str, Any]
    remez: dict[str, Any]
    calibration: dict[str, Any]
    finetune: dict[str, Any]
    control: dict[str, Any] | None = None
    probing: dict[str, Any] | None = None
    plots: dict[str, Any] | None = None
    metrics: dict[str, SAEMetrics]
    comparisons: dict[str, dict[str, float | None]] | None = Field(
        None, description="'a-b' -> {'delta_ce_diff', 'delta_ce_diff_se'}: delta CE of SAE a minus that of b on the "
        "same held-out tokens, with the standard error of the per-sequence differences (nats/token); and "
        "'mse_rel' = MSE_a / MSE_b - 1. Pairs: rsae_init-teacher, rsae-teacher, rsae-control, control-teacher.")
    headline: dict[str, float | None]
    eval_split: dict[str, Any]
    notes: list[str]
    timings_s: dict[str, float]
    versions: dict[str, str]


def headline(metrics: dict[str, SAEMetrics]) -> dict[str, float | None]:
    """Flat ``{<sae>_<metric>: value}`` for the job object (mse, fvu, l0, delta_ce, loss_recovered)."""
    out: dict[str, float | None] = {}
    for name, m in metrics.items():
        for k in ("mse", "fvu", "l0", "alive_fraction", "delta_ce", "loss_recovered", "kl"):
            out[f"{name}_{k}"] = getattr(m, k)
    return out


#: A paired difference counts as resolved when it is at least this many standard errors from 0.
RESOLVED_SE = 2.0


def difference_verdict(diff: float | None, se: float | None) -> str | None:
    """'lower' / 'higher' (|diff| >= ``RESOLVED_SE`` standard errors, or no s.e. to judge by), 'not resolved',
    or None without a difference: the reading of a ``Report.comparisons`` delta CE row (``diff``, ``se`` in
    nats/token; a normal approximation to the sequence-clustered mean, two-sided ~95%)."""
    if diff is None:
        return None
    if se is not None and se > 0 and abs(diff) < RESOLVED_SE * se:
        return "not resolved"
    return "lower" if diff < 0 else "higher"

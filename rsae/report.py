"""The evaluation report ``report.json``: a versioned pydantic schema, in the style of SAEBench's outputs.

Each section is a typed model that one pipeline stage (:mod:`rsae.pipeline`) produces; the JSON Schema of
:class:`Report` is checked in as ``docs/report.schema.json`` (regenerate with
``python -m rsae.report > docs/report.schema.json``; a test checks that the two agree). Units: MSE in
squared activation units per token; CE, KL and their differences in nats/token.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .config import UpgradeConfig
from .remez import RationalFit

REPORT_SCHEMA_VERSION = "rsae-report/9"
"""9: ``latent_identity`` (per-latent decoder cosine, activation correlation and firing rates of the RSAE and the
control against the teacher; :mod:`rsae.identity`). 8: ``data.storage`` (disk or streamed training activations),
``host_model.dtype``; ``finetune.objective``, ``kl_coefficient``, ``kl_sequences``; ``control.steps`` and
``control.batch_size``; ``config.remez.tail``, ``config.finetune.rsae_penalty`` / ``objective`` / ``kl_*``,
``config.data.split_seed``. 7: ``config.eval.batch_size`` is nullable in the request (None: chosen for the
device); a report records the number of sequences per forward that was used. 6: ``data.conventions`` (the
context conventions, each with its source) and ``data.source`` (hub data set options). 5:
``SAEMetrics.kl_zero`` (the zero-ablation KL, SAEBench's ``kl_div_with_ablation``).
4: typed sections (this module's models), ``config`` validated as :class:`rsae.config.UpgradeConfig`.
3: ``SAEMetrics.delta_ce_se`` and ``Report.comparisons`` (paired delta CE differences with standard errors)."""

Scalar = float | int | str | bool | None
"""A JSON scalar."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SAEMetrics(_Section):
    """Held-out metrics of one SAE. Units: MSE in squared residual units per token; CE, KL in nats/token.

    ``fvu`` is pooled about the per-dimension mean; ``fvu_about_zero`` divides by sum x^2 instead.
    Downstream fields are None when CE evaluation was disabled.
    """

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
        None, description="Standard error of delta CE, clustered by held-out sequence (nats/token)."
    )
    loss_recovered: float | None = None
    kl: float | None = None
    kl_zero: float | None = Field(
        None, description="KL(p_clean || p_zero) with the hook's residual replaced by zeros (nats/token)."
    )
    ce_tokens: int | None = None
    probe_accuracy: dict[str, float] | None = Field(
        None, description="k -> mean balanced accuracy of k-sparse one-vs-rest probes on the data set's labels."
    )


class HostModel(_Section):
    """The host model and the hook the SAEs read."""

    name: str
    layer: int
    hook: str
    d_model: int
    n_layers: int
    device: str
    dtype: str = Field(
        "float32",
        description="dtype of the host model's weights and forward (settings.model_dtype resolved; activations "
        "reach the SAEs in float32 whatever it is).",
    )


class TeacherInfo(_Section):
    """Provenance of the teacher SAE: its folder, weights sha256, architecture and training settings."""

    source: str
    sha256: str
    architecture: str
    family: str
    d_in: int
    d_sae: int
    l1_coefficient: float | None = None
    k: int | None = None
    original: dict[str, Any] | None = Field(
        None, description="The format it was imported from, if any (rsae.formats provenance)."
    )


class ActivationStats(_Section):
    """Residual-norm statistics of an activation split (units of the residual stream)."""

    mean_norm: float
    median_norm_sample: float
    frac_norm_above_3x_median_sample: float


class DataSplit(_Section):
    """One extracted activation split."""

    rows: int
    ctx_len: int
    dataset: str
    split: str
    stats: ActivationStats


class DataConventions(_Section):
    """The context conventions the activations were extracted with (SAELens ``metadata`` names and meanings;
    :class:`rsae.data.ContextConventions`) and, per key, where the value came from."""

    context_size: int = Field(description="Tokens per sequence, BOS included.")
    prepend_bos: bool = Field(description="Position 0 of every sequence is the tokenizer's BOS.")
    seqpos_slice: list[int | None] = Field(description="slice(*seqpos_slice) of positions whose activations are used.")
    exclude_special_tokens: bool | list[int] = Field(description="Special-token positions dropped.")
    sequence_separator_token: int | str | None = Field(description="Token between concatenated documents.")
    disable_concat_sequences: bool = Field(description="One sequence per document instead of concatenating.")
    sources: dict[str, Literal["request", "teacher", "default"]] = Field(
        description="Per key: set by the request, read from the teacher's cfg.json metadata, or the default."
    )


class DataSourceOptions(_Section):
    """How a Hugging Face data set or a table was read (``settings.data``)."""

    hf_config: str | None = None
    hf_split: str = "train"
    hf_revision: str | None = None
    text_column: str | None = None


class ActivationStorage(_Section):
    """Where the training activations lived (``settings.data.activation_storage``, :mod:`rsae.stream`)."""

    mode: Literal["disk", "stream"] = Field(
        description="'disk': all training rows extracted to shards, then read back; 'stream': extracted during "
        "fine-tuning through a mixing buffer."
    )
    requested: Literal["auto", "disk", "stream"] = Field(description="settings.data.activation_storage.")
    disk_rows: int = Field(description="Training rows on disk (all of them in disk mode; the head in stream mode).")
    buffer_rows: int | None = Field(None, description="Rows of the mixing buffer (stream mode).")


class DataSection(_Section):
    """The training and held-out activation splits, the context conventions and the data source options."""

    train: DataSplit
    eval: DataSplit
    conventions: DataConventions | None = None
    source: DataSourceOptions | None = None
    storage: ActivationStorage | None = None


class FitParams(_Section):
    """Inputs of the Remez fit: jump ``c``, margin, degrees (p, q); for jump families the anchor a where the
    teacher's threshold lands and the placement rule."""

    c: float
    margin: float
    p: int
    q: int
    anchor: float | None = None
    jump_placement: str | None = None


class RemezSection(RationalFit):
    """The relaxed Remez fit (:class:`rsae.remez.RationalFit`, whose fields it has) and its inputs ``params``."""

    params: FitParams


class Agreement(_Section):
    """Selection of the calibrated RSAE against the teacher's on the calibration tokens (fractions)."""

    teacher_active_kept: float
    teacher_inactive_leaked: float


class CalibrationSection(_Section):
    """Calibration of the gate scalars on real pre-activations (weights frozen) and the exact-zero floor."""

    steps: int
    tokens: int
    objective: str
    loss_before: float
    loss_after: float
    c_in_init: float
    thresholds: dict[str, Scalar] = Field(description="The family's jump rule (rsae.saes.JumpRule.info).")
    teacher_l0_calibration_tokens: float
    floor: float
    floor_over_fit_max_error: float | None = None
    floor_rule: str
    agreement: Agreement


class CurvePoint(_Section):
    """One held-out evaluation during fine-tuning."""

    step: int
    train_mse: float
    train_l0: float
    # "lambda" is a Python keyword: the field is ``lam``, serialised as "lambda".
    lam: float = Field(alias="lambda")
    eval_mse: float
    eval_l0: float
    eval_fvu: float

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)


class GateSummary(_Section):
    """The fine-tuned rational gate: coefficients, scales, floor."""

    a: list[float]
    b: list[float]
    c_in: float
    c_out: float
    floor: float
    train_scale: bool
    scale_median: float


class FinetuneSection(_Section):
    """Fine-tuning of all the RSAE's parameters."""

    steps: int
    batch_size: int
    lr: float
    gate_lr: float
    l1_coefficient: float
    l1_source: str
    l0_target: float | None
    teacher_l0_train: float
    final_lambda: float
    curve: list[CurvePoint]
    final_train: dict[str, float] | None = Field(description="Loss parts of the last training step.")
    gate: GateSummary
    objective: str = Field("mse", description="finetune.objective: 'mse' or 'mse+kl' (RSAE and control alike).")
    kl_coefficient: float | None = Field(
        None, description="beta of the KL term (nats/token -> squared activation units) with 'mse+kl'; else null."
    )
    kl_sequences: int | None = Field(None, description="Training sequences per step of the KL term; else null.")


class ControlSection(_Section):
    """The compute-matched control: the teacher fine-tuned with its own gate."""

    what: str
    steps: int | None = Field(None, description="Adam steps (the RSAE's finetune.steps; null in older reports).")
    batch_size: int | None = Field(None, description="Rows per step (the RSAE's finetune.batch_size).")
    objective: str
    initial_coefficient: float
    final_coefficient: float
    curve: list[CurvePoint]
    final_train: dict[str, float] | None = None


class ProbingSection(_Section):
    """k-sparse probing of every SAE on the data set's labels (:func:`rsae.probing.probe_sae` results)."""

    ks: list[int]
    train_sequences: int
    by_sae: dict[str, dict[str, Any]]
    dense_baseline: dict[str, Any] | None = None
    activations_top_k: dict[str, Any] | None = None


class Histogram(_Section):
    """A histogram: bin ``edges`` [bins + 1], ``counts`` [bins], drawn on a log axis when ``log``."""

    edges: list[float]
    counts: list[int]
    log: bool
    of: str


class GatePlot(_Section):
    """Data of the gate figure: teacher and RSAE gates on a grid of pre-activations, plus a histogram."""

    h: list[float]
    teacher: list[float]
    rsae_init: list[float]
    rsae: list[float]
    latent: int | None
    theta: float | None
    note: str
    hist: Histogram
    x_label: str | None = None


class Plots(_Section):
    """Data of the HTML report's figures."""

    gate: GatePlot


class Distribution(_Section):
    """Summary of one per-latent quantity over the ``n`` latents where it is defined (all None when ``n`` is 0):
    mean and quantiles (``q05`` = 5th percentile, linear interpolation as ``torch.quantile``), in the
    quantity's own units."""

    n: int
    mean: float | None = None
    min: float | None = None
    q05: float | None = None
    q25: float | None = None
    median: float | None = None
    q75: float | None = None
    q95: float | None = None
    max: float | None = None


class LatentChange(_Section):
    """One SAE (the fine-tuned RSAE or the control) against the teacher, latent j against latent j, on the
    held-out tokens (:func:`rsae.identity.latent_identity`)."""

    decoder_cos: Distribution = Field(description="cos(W_dec_teacher[j], W_dec[j]) over latents with non-zero rows.")
    activation_corr: Distribution = Field(
        description="Pearson correlation over tokens of the teacher's and this SAE's activation of latent j, over "
        "the latents where both vary (fired on some but not all tokens)."
    )
    corr_undefined: int = Field(description="Latents where either SAE's activation is constant (e.g. never fired).")
    firing_rate_ratio: Distribution = Field(
        description="Firing rate of this SAE / the teacher's, over the latents the teacher fired on (0: died)."
    )
    share_decoder_cos_at_least_0_9: float | None = Field(
        description="Share of the latents with a defined decoder cosine whose cosine is >= 0.9."
    )
    share_corr_at_least_0_9: float | None = Field(
        description="Share of the latents with a defined correlation whose correlation is >= 0.9."
    )
    share_rate_within_2x: float | None = Field(
        description="Share of the latents the teacher fired on whose firing rate ratio is in [0.5, 2]."
    )
    died: int = Field(description="Latents that fired for the teacher but never for this SAE on these tokens.")
    born: int = Field(description="Latents that never fired for the teacher but fired for this SAE.")
    died_latents: list[int] = Field(
        description="Indices of died latents, the teacher's most frequent first (at most ``listed_max``)."
    )
    born_latents: list[int] = Field(
        description="Indices of born latents, this SAE's most frequent first (at most ``listed_max``)."
    )


class LatentScatter(_Section):
    """Firing counts on the held-out tokens of a set of latents (all, or a seeded sample): the HTML scatter."""

    latents: list[int]
    teacher: list[int]
    rsae: list[int]
    sampled: bool = Field(description="True when ``latents`` is a seeded random subset of the d_sae latents.")


class LatentIdentitySection(_Section):
    """Whether the teacher's latents keep their identity after the upgrade (so explanations written for the
    teacher's latents, e.g. Neuronpedia or autointerp, still hold): per latent, decoder direction, activation
    correlation and firing rate, against the teacher, on the held-out tokens. The per-latent arrays are in
    ``artifact`` (:func:`rsae.identity.save_identity`); this section has their summaries and histograms."""

    n_tokens: int
    d_sae: int
    artifact: str
    listed_max: int
    firing_rate: dict[str, Distribution] = Field(
        description="Per SAE (teacher, rsae, control): fraction of held-out tokens on which a latent is exactly "
        "non-zero, over all latents."
    )
    dead: dict[str, int] = Field(description="Per SAE: latents that never fired on these tokens.")
    vs_teacher: dict[str, LatentChange] = Field(description="'rsae' and (with a control run) 'control'.")
    decoder_cos_hist: dict[str, Histogram]
    activation_corr_hist: dict[str, Histogram]
    density_hist: dict[str, Histogram] = Field(
        description="Per SAE: histogram of log10(firing rate) of the latents that fired (dead ones in ``dead``)."
    )
    scatter: LatentScatter


class Comparison(_Section):
    """SAE a against SAE b on the same held-out tokens."""

    mse_rel: float = Field(description="MSE_a / MSE_b - 1.")
    delta_ce_diff: float | None = Field(None, description="delta CE of a minus that of b (nats/token).")
    delta_ce_diff_se: float | None = Field(None, description="Standard error of the per-sequence differences.")


class EvalSplit(_Section):
    """What defines the held-out split (to rebuild it)."""

    model: str
    layer: int
    dataset: str
    split: str
    eval_fraction: float
    seed: int
    ctx_len: int
    eval_tokens: int


class Report(_Section):
    """Content of ``report.json``. ``metrics`` keys: ``teacher``, ``rsae_init`` (after calibration),
    ``rsae`` (after fine-tuning) and ``control`` (the teacher fine-tuned with its own gate on the same data,
    steps and objective). ``headline`` flattens the numbers a job listing shows. ``plots`` holds the data
    of the HTML report's figures (gate curves, pre-activation histogram); ``latent_identity`` compares the
    RSAE's and the control's latents with the teacher's, one by one."""

    schema_version: str = Field(REPORT_SCHEMA_VERSION)
    created_at: str
    config: UpgradeConfig
    host_model: HostModel
    teacher: TeacherInfo
    data: DataSection
    remez: RemezSection
    calibration: CalibrationSection
    finetune: FinetuneSection
    control: ControlSection | None = None
    probing: ProbingSection | None = None
    plots: Plots | None = None
    latent_identity: LatentIdentitySection | None = None
    metrics: dict[str, SAEMetrics]
    comparisons: dict[str, Comparison] | None = Field(
        None,
        description="'a-b' -> the comparison of SAE a with SAE b. Pairs: rsae_init-teacher, rsae-teacher, "
        "rsae-control, control-teacher.",
    )
    headline: dict[str, float | None]
    eval_split: EvalSplit
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


def report_json_schema() -> dict[str, Any]:
    """The JSON Schema of :class:`Report` (serialisation mode), as checked in at ``docs/report.schema.json``."""
    return Report.model_json_schema(mode="serialization")


if __name__ == "__main__":  # python -m rsae.report > docs/report.schema.json
    print(json.dumps(report_json_schema(), indent=2))

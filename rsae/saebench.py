"""An upgrade's evaluation as a SAEBench ``core`` eval result (``core_eval_results.json``).

SAEBench (Karvonen et al. 2025, https://github.com/adamkarvonen/SAEBench) writes one JSON per SAE and
evaluation; its ``core`` evaluation (reconstruction, sparsity, downstream loss, from SAELens's ``evals.py``)
is the one every SAE gets. The models below follow the output model of ``sae-bench==0.6.0``
(``sae_bench/evals/core/eval_output.py``: ``CoreEvalOutput``, its ``CoreEvalConfig``, the metric categories
``model_behavior_preservation``, ``model_performance_preservation``, ``reconstruction_quality``,
``shrinkage``, ``sparsity``, ``token_stats``, ``misc_metrics`` and the per-latent ``CoreFeatureMetric``),
field for field; ``tests/core/test_outputs.py`` validates what we write with SAEBench's own model.

Our values, on the upgrade's held-out split (not SAEBench's default OpenWebText sample): where our conventions
differ from SAEBench's, ``eval_result_unstructured.conventions`` says how (position 0 dropped instead of
special tokens masked; MSE as the mean per-token squared error, as SAELens computes it; the downstream loss
spliced at positions 1.. only). A metric that was not computed (CE / KL when ``eval.ce_sequences`` is 0) is
written as -1, SAEBench's own convention for NaN (``replace_nans_with_negative_one``), and its
``compute_*`` flag in ``eval_config`` is false.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from .saes import SAE

SAEBENCH_SCHEMA_VERSION = "0.6.0"
"""The ``sae-bench`` release whose ``core`` output model these models follow."""
CORE_EVAL_FILE = "core_eval_results.json"
"""File name of the result in an artifact folder (SAEBench names its files
``<release>_<sae id>_eval_results.json`` under ``eval_results/core/``; the artifact folder is flat)."""
MISSING = -1.0
"""Value of a metric that was not computed (SAEBench writes NaN as -1)."""
FLOAT_PRECISION = 10
"""Digits the per-latent details are rounded to (SAEBench's ``DEFAULT_FLOAT_PRECISION``)."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CoreEvalConfig(_Model):
    """SAEBench's ``CoreEvalConfig``: how the evaluation was run (our values: the upgrade's held-out split)."""

    model_name: str = Field("", description="Host model (a hub id when there is one).")
    llm_dtype: str = Field("float32", description="Host model dtype.")
    batch_size_prompts: int = Field(16, description="Sequences per forward pass of the downstream evaluation.")
    n_eval_reconstruction_batches: int = Field(10, description="Batches of the downstream (CE / KL) evaluation.")
    n_eval_sparsity_variance_batches: int = Field(1, description="Batches of the reconstruction evaluation.")
    dataset: str = Field("Skylion007/openwebtext", description="Data set evaluated on.")
    context_size: int = Field(128, description="Tokens per sequence.")
    compute_kl: bool = False
    compute_ce_loss: bool = False
    compute_l2_norms: bool = False
    compute_sparsity_metrics: bool = False
    compute_variance_metrics: bool = False
    compute_featurewise_density_statistics: bool = False
    compute_featurewise_weight_based_metrics: bool = False
    exclude_special_tokens_from_reconstruction: bool = False
    verbose: bool = False


class ModelBehaviorPreservationMetrics(_Model):
    """KL divergences of next-token distributions (nats/token) and the normalised score."""

    kl_div_score: float = Field(description="(kl_div_with_ablation - kl_div_with_sae) / kl_div_with_ablation.")
    kl_div_with_ablation: float
    kl_div_with_sae: float


class ModelPerformancePreservationMetrics(_Model):
    """Cross-entropies (nats/token) and the normalised score (our ``loss_recovered``)."""

    ce_loss_score: float = Field(description="(ce_with_ablation - ce_with_sae) / (ce_with_ablation - ce_without).")
    ce_loss_with_ablation: float
    ce_loss_with_sae: float
    ce_loss_without_sae: float


class ReconstructionQualityMetrics(_Model):
    """Explained variance (1 - FVU about the mean), its legacy per-token form, MSE, cosine similarity."""

    explained_variance: float
    explained_variance_legacy: float
    mse: float
    cossim: float


class ShrinkageMetrics(_Model):
    """Norms of inputs and reconstructions (residual units)."""

    l2_norm_in: float
    l2_norm_out: float
    l2_ratio: float
    relative_reconstruction_bias: float


class SparsityMetrics(_Model):
    """Mean latents per token that are non-zero (L0) and their mean sum (L1)."""

    l0: float
    l1: float


class TokenStatsMetrics(_Model):
    """Tokens behind the downstream and the reconstruction metrics."""

    total_tokens_eval_reconstruction: int
    total_tokens_eval_sparsity_variance: int


class MiscMetrics(_Model):
    """Shares of latents by firing rate, weight similarities, alive fraction."""

    freq_over_1_percent: float
    freq_over_10_percent: float
    normalized_freq_over_1_percent: float
    normalized_freq_over_10_percent: float
    average_max_encoder_cosine_sim: float
    average_max_decoder_cosine_sim: float
    frac_alive: float


class CoreMetricCategories(_Model):
    """SAEBench's ``CoreMetricCategories``."""

    model_behavior_preservation: ModelBehaviorPreservationMetrics
    model_performance_preservation: ModelPerformancePreservationMetrics
    reconstruction_quality: ReconstructionQualityMetrics
    shrinkage: ShrinkageMetrics
    sparsity: SparsityMetrics
    token_stats: TokenStatsMetrics
    misc_metrics: MiscMetrics


class CoreFeatureMetric(_Model):
    """Per-latent details (SAEBench's ``CoreFeatureMetric``)."""

    index: int
    feature_density: float
    consistent_activation_heuristic: float
    encoder_bias: float
    encoder_norm: float
    encoder_decoder_cosine_sim: float
    max_decoder_cosine_sim: float
    max_encoder_cosine_sim: float


class CoreEvalOutput(_Model):
    """SAEBench's ``CoreEvalOutput`` (``eval_type_id`` ``"core"``)."""

    eval_type_id: str = "core"
    eval_config: CoreEvalConfig
    eval_id: str
    datetime_epoch_millis: int = Field(ge=0, le=9_999_999_999_999)
    eval_result_metrics: CoreMetricCategories
    eval_result_details: list[CoreFeatureMetric] = Field(default_factory=list)
    sae_bench_commit_hash: str
    sae_lens_id: str | None
    sae_lens_release_id: str | None
    sae_lens_version: str | None
    sae_cfg_dict: dict[str, Any] | None
    eval_result_unstructured: Any | None = None


def _max_cosine(w: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Per column of ``w`` [d, F]: its largest cosine similarity with any other column, [F] (chunked, F x F
    never held; SAEBench's ``calculate_max_cosine_sim``, in float32 as there)."""
    u = torch.nn.functional.normalize(w.float(), dim=0)
    out = torch.empty(u.shape[1], dtype=torch.float64)
    for s in range(0, u.shape[1], chunk):
        sims = u[:, s : s + chunk].T @ u
        idx = torch.arange(sims.shape[0])
        sims[idx, idx + s] = -math.inf
        out[s : s + chunk] = sims.max(1).values
    return out


@torch.no_grad()
def weight_statistics(sae: SAE) -> dict[str, torch.Tensor]:
    """SAEBench's weight-based per-latent metrics of ``sae``, each [d_sae] float64: ``encoder_bias`` (b_enc),
    ``encoder_norm`` (||W_enc[:, j]||), ``encoder_decoder_cosine_sim`` (cos(W_enc[:, j], W_dec[j])),
    ``max_encoder_cosine_sim`` / ``max_decoder_cosine_sim`` (largest cosine with another latent's encoder /
    decoder direction; -inf for a single latent)."""
    w_enc, w_dec = sae.W_enc.detach().cpu().double(), sae.W_dec.detach().cpu().double()
    return {
        "encoder_bias": sae.b_enc.detach().cpu().double(),
        "encoder_norm": w_enc.norm(dim=0),
        "encoder_decoder_cosine_sim": torch.nn.functional.cosine_similarity(w_enc.T, w_dec, dim=-1),
        "max_encoder_cosine_sim": _max_cosine(sae.W_enc.detach().cpu()),
        "max_decoder_cosine_sim": _max_cosine(sae.W_dec.detach().cpu().T),
    }


def _num(v: float | None) -> float:
    """A metric value, :data:`MISSING` for None / NaN / inf (JSON has no NaN)."""
    return MISSING if v is None or not math.isfinite(v) else float(v)


def _misc(density: torch.Tensor, weights: dict[str, torch.Tensor]) -> MiscMetrics:
    """SAEBench's ``calculate_misc_metrics`` on feature densities [d_sae] and :func:`weight_statistics`."""
    total = density.sum()

    def share(th: float) -> float:
        return (density[density > th].sum() / total).item() if total > 0 else 0.0

    return MiscMetrics(
        freq_over_1_percent=(density > 0.01).double().mean().item(),
        freq_over_10_percent=(density > 0.1).double().mean().item(),
        normalized_freq_over_1_percent=share(0.01),
        normalized_freq_over_10_percent=share(0.1),
        average_max_encoder_cosine_sim=_num(weights["max_encoder_cosine_sim"].mean().item()),
        average_max_decoder_cosine_sim=_num(weights["max_decoder_cosine_sim"].mean().item()),
        frac_alive=(density > 0).double().mean().item(),
    )


def metric_categories(
    metrics: dict[str, Any], stats: dict[str, Any], weights: dict[str, torch.Tensor]
) -> CoreMetricCategories:
    """SAEBench's metric categories from our numbers.

    Args:
        metrics: an :class:`rsae.report.SAEMetrics` as a dict (``mse``, ``fvu``, ``l0``, and when downstream
            metrics were computed ``ce_clean``, ``ce_zero``, ``ce_spliced``, ``loss_recovered``, ``kl``,
            ``kl_zero``, ``ce_tokens``).
        stats: :func:`rsae.evaluate.core_statistics` of the same SAE on the same held-out rows.
        weights: :func:`weight_statistics` of the SAE.
    """
    kl, kl_zero = metrics.get("kl"), metrics.get("kl_zero")
    kl_score = (kl_zero - kl) / kl_zero if kl is not None and kl_zero else None
    return CoreMetricCategories(
        model_behavior_preservation=ModelBehaviorPreservationMetrics(
            kl_div_score=_num(kl_score), kl_div_with_ablation=_num(kl_zero), kl_div_with_sae=_num(kl)
        ),
        model_performance_preservation=ModelPerformancePreservationMetrics(
            ce_loss_score=_num(metrics.get("loss_recovered")),
            ce_loss_with_ablation=_num(metrics.get("ce_zero")),
            ce_loss_with_sae=_num(metrics.get("ce_spliced")),
            ce_loss_without_sae=_num(metrics.get("ce_clean")),
        ),
        reconstruction_quality=ReconstructionQualityMetrics(
            explained_variance=_num(1.0 - metrics["fvu"]),
            explained_variance_legacy=_num(stats["explained_variance_legacy"]),
            mse=_num(metrics["mse"]),
            cossim=_num(stats["cossim"]),
        ),
        shrinkage=ShrinkageMetrics(
            l2_norm_in=_num(stats["l2_norm_in"]),
            l2_norm_out=_num(stats["l2_norm_out"]),
            l2_ratio=_num(stats["l2_ratio"]),
            relative_reconstruction_bias=_num(stats["relative_reconstruction_bias"]),
        ),
        sparsity=SparsityMetrics(l0=_num(metrics["l0"]), l1=_num(stats["l1"])),
        token_stats=TokenStatsMetrics(
            total_tokens_eval_reconstruction=int(metrics.get("ce_tokens") or 0),
            total_tokens_eval_sparsity_variance=int(stats["n_tokens"]),
        ),
        misc_metrics=_misc(stats["feature_density"], weights),
    )


def feature_details(stats: dict[str, Any], weights: dict[str, torch.Tensor]) -> list[CoreFeatureMetric]:
    """One :class:`CoreFeatureMetric` per latent: density and ``consistent_activation_heuristic`` (firing
    tokens / sequences it fires in; -1 for a latent that never fires, SAEBench's NaN) from ``stats``, the
    weight-based metrics from ``weights``; rounded to :data:`FLOAT_PRECISION` digits."""
    counts = stats["feature_counts"].double()
    seqs = stats.get("feature_sequences")
    cah = counts / seqs.double() if seqs is not None else torch.full_like(counts, math.nan)
    cols = {
        "feature_density": stats["feature_density"],
        "consistent_activation_heuristic": cah,
        **weights,
    }
    lists = {k: v.tolist() for k, v in cols.items()}
    return [
        CoreFeatureMetric(index=i, **{k: round(_num(v[i]), FLOAT_PRECISION) for k, v in lists.items()})
        for i in range(counts.numel())
    ]


def core_eval_output(
    *,
    metrics: dict[str, Any],
    stats: dict[str, Any],
    weights: dict[str, torch.Tensor],
    eval_config: CoreEvalConfig,
    sae_cfg_dict: dict[str, Any],
    sae_lens_version: str | None,
    computed_by: str,
    unstructured: dict[str, Any] | None = None,
    sae_lens_id: str | None = None,
    sae_lens_release_id: str | None = None,
) -> CoreEvalOutput:
    """The whole ``core`` result of one SAE (see :func:`metric_categories` and :func:`feature_details`).

    ``sae_bench_commit_hash`` is not a SAEBench commit (SAEBench did not run): it records ``computed_by``
    (e.g. ``"rsae-service 0.1.0"``) and the schema release (:data:`SAEBENCH_SCHEMA_VERSION`).
    ``eval_result_unstructured`` holds ``unstructured`` (conventions, other SAEs' categories).
    """
    return CoreEvalOutput(
        eval_config=eval_config,
        eval_id=str(uuid.uuid4()),
        datetime_epoch_millis=int(time.time() * 1000),
        eval_result_metrics=metric_categories(metrics, stats, weights),
        eval_result_details=feature_details(stats, weights),
        sae_bench_commit_hash=f"none: computed by {computed_by} in the schema of sae-bench {SAEBENCH_SCHEMA_VERSION}",
        sae_lens_id=sae_lens_id,
        sae_lens_release_id=sae_lens_release_id,
        sae_lens_version=sae_lens_version,
        sae_cfg_dict=sae_cfg_dict,
        eval_result_unstructured=unstructured,
    )

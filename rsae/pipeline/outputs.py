"""Faithful, hub-ready outputs of the package stage: the ``cfg.json`` metadata in SAELens's conventions, and the
files beside the weights that SAELens, SAEBench and the hub read.

- :func:`cfg_metadata`: ``model_name`` a resolvable id (the bundled alias becomes its hub id, with the bundled
  file in ``model_source``), ``hook_name`` in the teacher's own spelling when it names the site that was read,
  ``context_size`` / ``prepend_bos`` / ``seqpos_slice`` / ``dataset_path`` of the data the RSAE was fitted on
  (the teacher's own values move to ``teacher_conventions``), and ``sae_lens_version`` the installed SAELens
  (omitted when it is not installed).
- :func:`write_hub_outputs`: ``sparsity.safetensors`` (SAELens's file: tensor ``"sparsity"`` = log10 of each
  latent's firing rate + 1e-10, here on the held-out rows), ``core_eval_results.json`` (SAEBench's ``core``
  result, :mod:`rsae.saebench`) and ``README.md`` (the hub model card, :mod:`rsae.model_card`).
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import re
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..config import UpgradeConfig
from ..evaluate import core_statistics
from ..model_card import model_card
from ..models import public_model
from ..saebench import (
    CORE_EVAL_FILE,
    CoreEvalConfig,
    CoreEvalOutput,
    core_eval_output,
    metric_categories,
    weight_statistics,
)
from ..saes import SAE
from ..versions import package_versions
from .checkpoints import write_json_atomic
from .state import UpgradeState

SPARSITY_FILE = "sparsity.safetensors"
"""SAELens's name (``sae_lens.constants.SPARSITY_FILENAME``) for the log10 feature densities."""
SPARSITY_KEY = "sparsity"
"""The tensor's key in it (what ``sae_lens.loading.pretrained_sae_loaders`` reads)."""
SPARSITY_EPS = 1e-10
"""Added before log10, as SAELens's trainer does (``_log_feature_sparsity``): a dead latent is -10."""
MODEL_CARD_FILE = "README.md"
"""The hub's model card file."""
CORE_BATCH_ROWS = 2048
"""Rows per batch of the core statistics (SAEBench's 16 prompts x 128 tokens; the legacy explained variance
uses each batch's mean)."""

DATA_KEYS = ("context_size", "prepend_bos", "seqpos_slice", "dataset_path")
"""SAELens metadata keys that describe the training data: written for the upgrade's data."""
RECORDED_KEYS = ("exclude_special_tokens", "sequence_separator_token", "disable_concat_sequences")
"""SAELens data conventions written for the RSAE only when the activation manifest records them."""
TEACHER_ONLY_KEYS = (
    *DATA_KEYS,
    "exclude_special_tokens",  # the teacher's data conventions; the RSAE's are those of DATA_KEYS
    "sequence_separator_token",
    "disable_concat_sequences",
    "position_0_dropped",  # rsae's demo teachers (rsae.teacher); the RSAE says it with seqpos_slice
    "model_name",
    "hook_name",
    "neuronpedia_id",  # the teacher's latent dashboards, not the RSAE's
    "sae_lens_version",
    "sae_lens_training_version",
)
"""Teacher metadata keys that would be wrong for the RSAE: kept under ``metadata.teacher_conventions``."""

_TL_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_MODULE_BLOCK = re.compile(r"^(?:model\.layers|layers|transformer\.h|gpt_neox\.layers|model\.decoder\.layers)\.(\d+)$")


def hook_site(name: str) -> tuple[int, str] | None:
    """``(block, site)`` of a hook name, or None when unrecognised: TransformerLens style
    (``blocks.5.hook_resid_post`` -> (5, "hook_resid_post"); ``blocks.6.hook_resid_pre`` is the same tensor as
    (5, "hook_resid_post")) or an HF / sparsify block module path (``model.layers.5``, ``layers.5``,
    ``transformer.h.5``: the block's output, (5, "hook_resid_post"))."""
    m = _TL_HOOK.match(name)
    if m:
        layer, site = int(m.group(1)), m.group(2)
        if site == "hook_resid_pre" and layer > 0:
            return layer - 1, "hook_resid_post"
        return layer, site
    m = _MODULE_BLOCK.match(name)
    return (int(m.group(1)), "hook_resid_post") if m else None


def output_hook_name(teacher_hook: Any, read_hook: str) -> str:
    """The ``hook_name`` of the upgraded SAE: the teacher's own spelling when it names the site that was read
    (:func:`hook_site` equal), else ``read_hook`` (TransformerLens style)."""
    if isinstance(teacher_hook, str) and teacher_hook:
        site = hook_site(teacher_hook)
        if site is not None and site == hook_site(read_hook):
            return teacher_hook
    return read_hook


def installed_version(dist: str) -> str | None:
    """The installed version of distribution ``dist`` (package metadata only; nothing imported), else None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def data_conventions(state: UpgradeState, dataset: str) -> dict[str, Any]:
    """SAELens's data keys for the rows the RSAE was fitted on (the training split's manifest): ``context_size``
    (tokens per sequence), ``prepend_bos``, ``seqpos_slice`` (``[1, null]`` when position 0 was dropped) and
    ``dataset_path`` (``dataset``, the public name); plus those of :data:`RECORDED_KEYS` the manifest records.
    All come from the manifest's ``conventions`` (what extraction used), else its top-level keys."""
    m = state.train.manifest
    conv = {**m, **(m.get("conventions") or {})}
    seqpos = conv.get("seqpos_slice")
    if seqpos is None:
        seqpos = [1, None] if m.get("position_0_dropped", False) else [None]
    out = {
        "context_size": int(m["ctx_len"]),
        "prepend_bos": bool(conv.get("prepend_bos", False)),
        "seqpos_slice": list(seqpos),
        "dataset_path": dataset,
    }
    out.update({k: conv[k] for k in RECORDED_KEYS if k in conv})
    return out


def cfg_metadata(
    state: UpgradeState, cfg: UpgradeConfig, teacher_metadata: dict[str, Any], teacher: dict[str, Any]
) -> dict[str, Any]:
    """The ``metadata`` of the upgraded SAE's ``cfg.json``.

    Args:
        state: a state that went through evaluate (its training manifest describes the data).
        cfg: the request as the artifacts show it (public references in place of server paths).
        teacher_metadata: the teacher's own metadata (already stripped of server paths).
        teacher: the teacher's provenance (:class:`rsae.report.TeacherInfo` as a dict).

    Returns:
        The teacher's other metadata, then ``model_name`` (+ ``model_source`` for a bundled file),
        ``hook_name``, ``hook_layer``, the :func:`data_conventions`, ``sae_lens_version`` when SAELens is
        installed, ``teacher``, ``teacher_conventions`` (the teacher's values of :data:`TEACHER_ONLY_KEYS`),
        ``method``, ``upgrade_config`` and ``versions``.
    """
    inherited = dict(teacher_metadata)
    own = {k: inherited.pop(k) for k in TEACHER_ONLY_KEYS if k in inherited}
    model_name, source = public_model(cfg.model)
    out: dict[str, Any] = {**inherited, "model_name": model_name}
    if source is not None:
        out["model_source"] = source
    read = cfg.hook or f"blocks.{cfg.layer}.hook_resid_post"  # resolved by new_state; unresolved: the default site
    out["hook_name"] = output_hook_name(own.get("hook_name"), read)
    out["hook_layer"] = cfg.layer
    out.update(data_conventions(state, cfg.data.dataset))
    sae_lens = installed_version("sae-lens")
    if sae_lens is not None:  # SAELens reads a cfg without it as pre-6.0 (see docs/formats.md)
        out["sae_lens_version"] = sae_lens
    out.update(
        teacher=teacher,
        teacher_conventions=own,
        method="rsae (Yin & Yu 2026, arXiv 2606.14990)",
        upgrade_config=cfg.model_dump(mode="json"),
        versions=package_versions(),
    )
    return out


def rows_per_sequence(manifest: dict[str, Any]) -> int | None:
    """Activation rows each sequence contributes: from a full shard of the manifest, else ``ctx_len`` less the
    dropped position 0 (a split of one truncated shard)."""
    for s in manifest.get("shards", []):
        if s.get("sequences") and s["rows"] % s["sequences"] == 0:
            return s["rows"] // s["sequences"]
    ctx = manifest.get("ctx_len")
    return ctx - 1 if isinstance(ctx, int) and manifest.get("position_0_dropped") else ctx


def write_sparsity(path: Path, density: torch.Tensor) -> None:
    """Write SAELens's ``sparsity.safetensors``: ``{"sparsity": log10(density + 1e-10)}`` [d_sae] float32,
    atomically (temp + rename)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    save_file({SPARSITY_KEY: torch.log10(density.double() + SPARSITY_EPS).float().contiguous()}, str(tmp))
    os.replace(tmp, path)


def core_config(state: UpgradeState, cfg: UpgradeConfig, model_name: str, rows: int) -> CoreEvalConfig:
    """SAEBench's ``core`` eval config (sae_bench 0.6.0 ``CoreEvalConfig``) describing our held-out evaluation of
    ``state`` (``state.evals``, ``cfg.eval``) of host model ``model_name`` over ``rows`` activation rows."""
    downstream = cfg.eval.ce_sequences > 0
    return CoreEvalConfig(
        model_name=model_name,
        llm_dtype=state.host.dtype if state.host is not None else "float32",
        batch_size_prompts=cfg.eval.batch_size,
        n_eval_reconstruction_batches=math.ceil(cfg.eval.ce_sequences / cfg.eval.batch_size) if downstream else 0,
        n_eval_sparsity_variance_batches=math.ceil(rows / CORE_BATCH_ROWS),
        dataset=cfg.data.dataset,
        context_size=int(state.evals.manifest["ctx_len"]),
        compute_kl=downstream,
        compute_ce_loss=downstream,
        compute_l2_norms=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
        compute_featurewise_density_statistics=True,
        compute_featurewise_weight_based_metrics=True,
    )


CONVENTIONS = [
    "Held-out rows of the upgrade's own data (eval split), not SAEBench's OpenWebText sample.",
    "Position 0 of each sequence is dropped (seqpos_slice in the cfg); no other special-token masking.",
    "mse: mean over tokens of the per-token sum of squared errors (SAELens's definition; sae-bench 0.6.0 "
    "also divides by the tokens of its batch).",
    "explained_variance = 1 - FVU about the per-dimension mean, pooled over all held-out tokens.",
    "CE / KL: the host model with the reconstruction spliced in at positions 1.. of the hook, loss over "
    "targets 2..T-1; -1 and compute_kl / compute_ce_loss false when not evaluated.",
    "l1: mean sum of |z| per token; feature density: share of tokens with z != 0.",
]
"""How our numbers differ from what SAEBench would compute (``eval_result_unstructured.conventions``)."""


def core_result(
    state: UpgradeState,
    cfg: UpgradeConfig,
    saes: dict[str, SAE],
    metrics: dict[str, dict[str, Any]],
    sae_cfg: dict[str, Any],
) -> tuple[CoreEvalOutput, dict[str, Any]]:
    """SAEBench's ``core`` result (:func:`rsae.saebench.core_eval_output`) of the first SAE of ``saes``, with the
    other SAEs' metric categories in ``eval_result_unstructured.other_saes``.

    One pass over the held-out rows of ``state.evals`` per SAE (:func:`rsae.evaluate.core_statistics`, batches of
    :data:`CORE_BATCH_ROWS`).

    Args:
        state: a state with ``evals`` (and ``host``). cfg: the request as the outputs show it. saes: name -> SAE,
            the SAE reported first. metrics: name -> its :class:`rsae.report.SAEMetrics` fields (names missing
            here are left out of ``other_saes``). sae_cfg: the first SAE's ``cfg.json`` content (its
            ``metadata.model_name`` names the model, else ``cfg.model``).

    Returns:
        The result and the first SAE's statistics (``feature_density`` [d_sae] float64 among them).
    """
    rps = rows_per_sequence(state.evals.manifest)
    stats, weights = {}, {}
    for name, sae in saes.items():
        sae.eval()
        stats[name] = core_statistics(sae, state.evals.iter_ordered(CORE_BATCH_ROWS), rps)
        weights[name] = weight_statistics(sae)
    main = next(iter(saes))
    model_name = (sae_cfg.get("metadata") or {}).get("model_name") or cfg.model
    others = {
        k: metric_categories(metrics[k], stats[k], weights[k]).model_dump(mode="json")
        for k in saes
        if k != main and k in metrics
    }
    result = core_eval_output(
        metrics=metrics[main],
        stats=stats[main],
        weights=weights[main],
        eval_config=core_config(state, cfg, model_name, stats[main]["n_tokens"]),
        sae_cfg_dict=sae_cfg,
        sae_lens_version=(sae_cfg.get("metadata") or {}).get("sae_lens_version"),
        computed_by=f"rsae-service {installed_version('rsae-service') or 'unknown'}",
        unstructured={"sae": main, "conventions": CONVENTIONS, "other_saes": others},
    )
    return result, stats[main]


def write_hub_outputs(state: UpgradeState, cfg: UpgradeConfig, report: dict[str, Any], sae_cfg: dict[str, Any]) -> None:
    """Write ``sparsity.safetensors``, ``core_eval_results.json`` and ``README.md`` to ``state.out_dir``.

    One pass over the held-out rows per SAE (RSAE, teacher, control when present): :func:`rsae.evaluate.
    core_statistics`. The RSAE's statistics give the sparsity file and the SAEBench result; the teacher's and
    the control's categories go to ``eval_result_unstructured.other_saes`` for comparison.

    Args:
        state: a state that went through evaluate. cfg: the request as the artifacts show it.
        report: the ``report.json`` content (model card). sae_cfg: the RSAE's ``cfg.json`` content.
    """
    out = state.out_dir
    saes: dict[str, SAE] = {"rsae": state.rsae, "teacher": state.teacher}
    if state.control is not None:
        saes["control"] = state.control
    metrics = {k: m.model_dump() for k, m in state.metrics.items()}
    result, stats = core_result(state, cfg, saes, metrics, sae_cfg)
    write_sparsity(out / SPARSITY_FILE, stats["feature_density"])
    write_json_atomic(out / CORE_EVAL_FILE, result.model_dump(mode="json"))
    files = sorted({p.name for p in out.iterdir() if p.is_file() and not p.name.startswith(".")} | {"report.json"})
    card = model_card(report, sae_cfg, [f for f in files if f != MODEL_CARD_FILE])
    tmp = out / f".{MODEL_CARD_FILE}.{uuid.uuid4().hex}.tmp"
    tmp.write_text(card, encoding="utf-8")
    os.replace(tmp, out / MODEL_CARD_FILE)

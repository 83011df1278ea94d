"""The evaluation alone (``rsae eval``): held-out metrics of one SAE, in any format the project reads, without
an upgrade.

The SAE is read by :func:`load_any_sae` (SAELens layout, Gemma Scope, sparsify, dictionary_learning through
:func:`rsae.formats.load_teacher`; an RSAE artifact, ``architecture: "rational"``, through
:func:`rsae.saes.load_sae`). The rest is the upgrade's own code on a state whose "teacher" is that SAE
(:func:`rsae.pipeline.state.state_for`): the hook site from the request or the SAE's ``cfg.json``
(:func:`rsae.pipeline.state.resolve_hook_site`), the width check (:func:`rsae.pipeline.extract.host_section`),
the context conventions from the request, else the SAE's cfg, else the defaults
(:func:`rsae.pipeline.extract.conventions`), the held-out ("eval") split of the data set's documents and its
activations (:func:`rsae.pipeline.extract.activations`: the same split, seed and chunking as an upgrade with the
same settings, so the numbers compare with a report's teacher column), reconstruction metrics
(:func:`rsae.evaluate.reconstruction_metrics`), delta CE / loss recovered / KL with sequence-clustered standard
errors (:func:`rsae.pipeline.evaluate.add_downstream`), k-sparse probes when asked
(:func:`rsae.pipeline.evaluate.probe`) and SAEBench's ``core`` result (:func:`rsae.pipeline.outputs.core_result`).

Settings are :class:`rsae.config.UpgradeConfig` fields (``data``, ``eval``, ``model_dtype``, ``seed``,
``device``); the other stages' fields are accepted and ignored. One default differs from an upgrade's:
probing is off (``eval.probe_ks`` ``[]``) unless the settings give ``eval.probe_ks``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .config import STAGES, UpgradeConfig
from .device import pick_device
from .evaluate import reconstruction_metrics
from .formats import detect_format, load_teacher
from .pipeline.checkpoints import write_json_atomic
from .pipeline.evaluate import add_downstream, probe
from .pipeline.extract import activations, conventions, host_section
from .pipeline.outputs import core_result
from .pipeline.progress import STAGE_WEIGHTS, Progress, RunContext
from .pipeline.state import UpgradeState, state_for
from .report import SAEMetrics
from .saebench import CORE_EVAL_FILE
from .saes import CFG_NAME, SAE, RationalSAE, family_names, get_family, load_sae
from .versions import package_versions

EVAL_FILE = "eval.json"
"""The result file ``rsae eval --out DIR`` writes (beside SAEBench's :data:`rsae.saebench.CORE_EVAL_FILE`)."""
EVAL_SCHEMA = "rsae-eval/1"
"""The ``schema`` value of the result: bump it when its keys change."""
EVAL_DEFAULTS: dict[str, Any] = {"eval": {"probe_ks": []}}
"""Settings that differ from an upgrade's defaults: no probes unless asked for."""
RECON_BATCH_ROWS = 2048
"""Held-out rows per batch of the reconstruction metrics (as the upgrade's evaluate stage)."""


def load_any_sae(
    path: str | Path, *, format: str | None = None, hookpoint: str | None = None
) -> tuple[SAE, dict | None]:
    """An SAE folder in any layout the project reads, and how it was read.

    Args:
        path: the folder (or a file in it). format: force one of :data:`rsae.formats.FORMATS`. hookpoint: the
            sub-folder of a sparsify run folder.

    Returns:
        The SAE (CPU, float32, eval mode; encode x [..., d_in] -> z [..., d_sae]) and the detection report
        (:meth:`rsae.formats.DetectedFormat.to_dict`), or None for an RSAE artifact (read as saved).

    Raises:
        TeacherError: no recognised files, or files that do not load (the field names the file or key).
    """
    fmt, folder = detect_format(path, hookpoint=hookpoint)
    if fmt == "saelens" and format in (None, "saelens"):
        try:
            arch = json.loads((folder / CFG_NAME).read_text(encoding="utf-8")).get("architecture")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, RecursionError):
            arch = None  # load_teacher reports the unreadable cfg
        if arch == RationalSAE.architecture:
            return load_sae(folder), None
    loaded = load_teacher(path, format=format, hookpoint=hookpoint)
    return loaded.sae, loaded.detected.to_dict()


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def eval_config(
    sae_path: str | Path,
    *,
    model: str,
    layer: int | None = None,
    hook: str | None = None,
    dataset: str | None = None,
    settings: dict[str, Any] | None = None,
) -> UpgradeConfig:
    """The request of an evaluation: ``settings`` (UpgradeConfig fields) over :data:`EVAL_DEFAULTS`, with
    ``dataset`` (when given) as ``data.dataset``.

    Raises:
        pydantic.ValidationError (a ValueError): an unknown or invalid field.
    """
    merged = _merge(EVAL_DEFAULTS, settings or {})
    if dataset is not None:
        merged = _merge(merged, {"data": {"dataset": dataset}})
    return UpgradeConfig(model=model, layer=layer, hook=hook, teacher=str(sae_path), **merged)


def _rescaled(on_progress: Callable[[str, float, dict | None], None] | None):
    """The pipeline's overall progress (weights of all six stages) mapped to this evaluation's two stages:
    extract 0..0.5, evaluate 0.5..1."""
    if on_progress is None:
        return None

    def cb(stage: str, overall: float, metrics: dict | None = None) -> None:
        before = sum(STAGE_WEIGHTS[s] for s in STAGES[: STAGES.index(stage)])
        frac = min(1.0, max(0.0, (overall - before) / STAGE_WEIGHTS[stage]))
        on_progress(stage, 0.5 * frac + (0.5 if stage == "evaluate" else 0.0), metrics)

    return cb


def _extract(state: UpgradeState, ctx: RunContext) -> None:
    """Fill ``state.host``, ``state.evals`` and, when probes are asked for, ``state.train`` (enough training rows
    for ``eval.probe_train_sequences`` sequences)."""
    cfg = state.cfg
    ctx.progress.enter("extract")
    state.host = host_section(state)
    conv = conventions(state)
    probes = bool(cfg.eval.probe_ks) and cfg.eval.probe_train_sequences > 0
    if probes:
        rows = cfg.eval.probe_train_sequences * len(conv.kept_positions)
        state.train = activations(state, ctx, "train", rows, state.work_dir / "acts-train", 0.0, 0.5, conv)
    state.evals = activations(
        state, ctx, "eval", cfg.data.eval_tokens, state.work_dir / "acts-eval", 0.5 if probes else 0.0, 1.0, conv
    )


def _data(state: UpgradeState) -> dict[str, Any]:
    """The result's ``data``: what the held-out activations are (as the report's ``data.eval``), their context
    conventions with each value's source, and how the data source was read."""
    m = state.evals.manifest
    out = {"eval": {k: m[k] for k in ("rows", "ctx_len", "dataset", "split", "stats")}}
    out |= {
        "conventions": m.get("conventions"),
        "source": m.get("source"),
        "eval_fraction": state.cfg.data.eval_fraction,
    }
    if state.train is not None:
        out["probe_train"] = {k: state.train.manifest[k] for k in ("rows", "ctx_len", "dataset", "split")}
    return out


def _sae_info(path: str | Path, sae: SAE, source: dict | None) -> dict[str, Any]:
    cfg = sae.cfg_dict()
    return {
        "path": str(Path(path).resolve()),
        "class": type(sae).__name__,
        "architecture": cfg["architecture"],
        "family": sae.family,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "source": source,
    }


def _metrics(state: UpgradeState, ctx: RunContext, sae: SAE) -> dict[str, Any]:
    """The SAE's metrics (:class:`rsae.report.SAEMetrics` fields) and the probing section (or None)."""
    ctx.progress.enter("evaluate")
    metrics = {"sae": reconstruction_metrics(sae, state.evals.iter_ordered(RECON_BATCH_ROWS))}
    add_downstream(state, ctx, {"sae": sae}, metrics)
    probing = probe(state, {"sae": sae}) if state.train is not None else None
    if probing is not None:
        metrics["sae"]["probe_accuracy"] = probing.by_sae["sae"]["k"]
    ctx.progress.report(1.0)
    m = SAEMetrics(**{k: v for k, v in metrics["sae"].items() if v is not None})
    return {"metrics": m, "probing": probing}


def evaluate_sae(
    sae_path: str | Path,
    cfg: UpgradeConfig,
    *,
    out_dir: str | Path | None = None,
    work_dir: str | Path | None = None,
    format: str | None = None,
    hookpoint: str | None = None,
    core: bool = True,
    on_progress: Callable[[str, float, dict | None], None] | None = None,
) -> dict[str, Any]:
    """Evaluate one SAE alone on the held-out split of ``cfg.data`` (see the module docstring).

    Args:
        sae_path: the SAE folder (any format :func:`load_any_sae` reads). cfg: the request (:func:`eval_config`).
        out_dir: when set, :data:`EVAL_FILE` (the result) and, with ``core``, SAEBench's
            :data:`rsae.saebench.CORE_EVAL_FILE` are written there (atomically). work_dir: where the
            activations go; reused when their manifest matches the request (None: a temporary folder, removed).
        format, hookpoint: as :func:`load_any_sae`. core: also compute SAEBench's ``core`` result.
        on_progress: ``(stage, overall progress in [0, 1], metrics or None)``, stages "extract" and "evaluate".

    Returns:
        ``{"schema", "sae", "host", "data", "config", "metrics", "probing", "notes", "timings", "files",
        "versions"}``: ``metrics`` as :class:`rsae.report.SAEMetrics` (MSE in squared activation units per token;
        CE, delta CE, its standard error clustered by sequence, KL in nats/token; loss recovered a fraction);
        ``files`` the paths written (empty without ``out_dir``).

    Raises:
        TeacherError: an unreadable SAE, or one whose d_in is not the width at the hook site. ModelError: an
            unknown model or hook site, or none named. DataError: an unreadable or too small data set.
    """
    sae, source = load_any_sae(sae_path, format=format, hookpoint=hookpoint)
    family = get_family(sae.family) if sae.family in family_names() else None
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    tmp = None if work_dir is not None else tempfile.mkdtemp(prefix="rsae-eval-")
    work = Path(work_dir if work_dir is not None else tmp)
    try:
        state = state_for(cfg, sae, family, work, work, device)
        ctx = RunContext(Progress(_rescaled(on_progress)))
        t0 = time.time()
        _extract(state, ctx)
        t1 = time.time()
        got = _metrics(state, ctx, state.teacher)
        result = {
            "schema": EVAL_SCHEMA,
            "sae": _sae_info(sae_path, sae, source),
            "host": state.host.model_dump(mode="json"),
            "data": _data(state),
            "config": state.cfg.model_dump(mode="json", include={"model", "layer", "hook", "data", "eval", "seed"}),
            "metrics": got["metrics"].model_dump(mode="json"),
            "probing": None if got["probing"] is None else got["probing"].model_dump(mode="json", by_alias=True),
            "notes": list(state.notes),
            "timings": {"extract": t1 - t0, "evaluate": time.time() - t1},
            "files": {},
            "versions": package_versions(),
        }
        if out_dir is not None:
            _write(Path(out_dir), state, result, got["metrics"], core)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return result


def _write(out: Path, state: UpgradeState, result: dict[str, Any], metrics: SAEMetrics, core: bool) -> None:
    """Write SAEBench's core result (when ``core``) and then the result itself to ``out``, recording both paths
    in ``result["files"]``."""
    out.mkdir(parents=True, exist_ok=True)
    if core:
        sae = state.teacher
        res, _ = core_result(state, state.cfg, {"sae": sae}, {"sae": metrics.model_dump()}, sae.cfg_dict())
        write_json_atomic(out / CORE_EVAL_FILE, res.model_dump(mode="json"))
        result["files"]["core"] = str((out / CORE_EVAL_FILE).resolve())
    result["files"]["eval"] = str((out / EVAL_FILE).resolve())
    write_json_atomic(out / EVAL_FILE, result)

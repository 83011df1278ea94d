"""Stage 6, package: write the upgraded SAE (SAELens layout, ``architecture: "rational"``) and its report.

Files (:data:`ARTIFACT_FILES`) are written to temporary names and renamed, so a reader never sees a
half-written file. An SAE with non-finite weights is never published.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ..config import ArtifactRefs, UpgradeConfig
from ..errors import NumericalError
from ..formats import provenance as teacher_provenance
from ..identity import IDENTITY_FILE
from ..report import EvalSplit, RemezSection, Report, TeacherInfo, headline
from ..saebench import CORE_EVAL_FILE
from ..saes import WEIGHTS_NAME, sha256_file
from ..versions import package_versions
from .checkpoints import write_json_atomic
from .evaluate import comparison_table
from .extract import split_seed
from .outputs import MODEL_CARD_FILE, SPARSITY_FILE, cfg_metadata, write_hub_outputs
from .progress import RunContext
from .state import UpgradeState

log = logging.getLogger(__name__)

ARTIFACT_FILES: dict[str, tuple[str, str]] = {
    # name -> (kind, content type)
    "sae_weights.safetensors": ("weights", "application/octet-stream"),
    "cfg.json": ("config", "application/json"),
    SPARSITY_FILE: ("sparsity", "application/octet-stream"),
    IDENTITY_FILE: ("identity", "application/octet-stream"),
    "report.json": ("report", "application/json"),
    "report.html": ("report", "text/html"),
    CORE_EVAL_FILE: ("eval", "application/json"),
    MODEL_CARD_FILE: ("model_card", "text/markdown"),
}
"""Files of an upgraded SAE's artifact folder: the SAELens layout (weights, cfg, log10 feature densities), the
evaluation report, the per-latent identity arrays (:mod:`rsae.identity`), the SAEBench ``core`` result and the hub
model card (docs/formats.md, "RSAEs out")."""


def _without_path(source: Any) -> Any:
    """A teacher's import report (``metadata.source`` / provenance ``original``) without its ``path`` (the
    folder the import read: a server's temporary upload folder)."""
    return {k: v for k, v in source.items() if k != "path"} if isinstance(source, dict) else source


def teacher_info(state: UpgradeState, refs: ArtifactRefs | None = None) -> TeacherInfo:
    """The teacher's provenance: reference (``refs.teacher``, else its folder), weights sha256, architecture,
    family, sizes, training settings; with ``refs.teacher`` set, the import report carries no folder."""
    teacher, cfg = state.teacher, state.cfg
    original = teacher_provenance(cfg.teacher).get("original")
    public = refs is not None and refs.teacher is not None
    return TeacherInfo(
        source=refs.teacher if public else str(cfg.teacher),
        sha256=sha256_file(Path(cfg.teacher) / WEIGHTS_NAME),
        architecture=teacher.architecture,
        family=teacher.family,
        d_in=teacher.d_in,
        d_sae=teacher.d_sae,
        l1_coefficient=teacher.metadata.get("l1_coefficient"),
        k=getattr(teacher, "k", None),
        original=_without_path(original) if public else original,
    )


def public_config(state: UpgradeState, refs: ArtifactRefs | None) -> UpgradeConfig:
    """The request as the artifacts show it: ``state.cfg`` with the references of ``refs`` in place of paths."""
    return state.cfg if refs is None else refs.apply(state.cfg)


def _notes(state: UpgradeState) -> list[str]:
    """The report's closing notes (conventions, outliers, where exact zeros come from, the family's own)."""
    capped = state.init.rank_capped
    stats = state.evals.manifest["stats"]
    return [
        "Position 0 of every sequence (attention sink) is excluded from activations and metrics.",
        "FVU is pooled about the per-dimension mean; fvu_about_zero divides by sum x^2.",
        f"{stats['frac_norm_above_3x_median_sample']:.2%} of held-out tokens (sample) have "
        "residual norm > 3x the median; they are kept and weigh heavily in MSE and FVU.",
        "L0 counts exactly non-zero latents; the RSAE's exact zeros come from "
        + (
            "the top-k cap (only each token's k largest pre-activations can be non-zero) and a floor of 0 on r."
            if capped
            else "its floor (r-units), set so its L0 on the calibration tokens equals the teacher's."
        ),
    ] + state.family.notes(state.teacher, state.init.thresholds)


def _write_html(data: dict[str, Any], out_dir: Path) -> None:
    """Write ``report.html`` beside ``report.json`` (a failure to render is noted in ``data``, never fatal)."""
    from ..report_html import write_report_html

    try:
        write_report_html(data, out_dir / "report.html")
    except Exception as e:  # noqa: BLE001 - a plotting failure must not lose the upgraded SAE
        log.exception("report.html could not be rendered")
        data["notes"].append(f"report.html could not be rendered: {type(e).__name__}: {e}")


def _copy_identity(state: UpgradeState) -> None:
    """Copy the evaluate stage's per-latent identity arrays from the work dir to the artifacts (temp + rename);
    a state restored from a checkpoint written before the identity existed has none: noted, not fatal."""
    src = state.work_dir / IDENTITY_FILE
    if not src.is_file():
        state.notes.append("latent identity not available: the evaluate stage ran without it (resumed job)")
        return
    tmp = state.out_dir / f".{IDENTITY_FILE}.tmp"
    shutil.copyfile(src, tmp)
    os.replace(tmp, state.out_dir / IDENTITY_FILE)


def build_report(state: UpgradeState, refs: ArtifactRefs | None = None) -> Report:
    """The :class:`rsae.report.Report` of a state that went through evaluate; the config, host model and
    data sections name the inputs as ``refs`` says (:func:`public_config`)."""
    cfg, fit = public_config(state, refs), state.init.fit
    data, host = state.data_section, state.host
    if refs is not None and refs.model is not None:
        host = host.model_copy(update={"name": refs.model})
    if refs is not None and refs.dataset is not None:
        data = data.model_copy(
            update={
                "train": data.train.model_copy(update={"dataset": refs.dataset}),
                "eval": data.eval.model_copy(update={"dataset": refs.dataset}),
            }
        )
    return Report(
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(),
        config=cfg,
        host_model=host,
        teacher=state.rsae.metadata["teacher"],
        data=data,
        remez=RemezSection(**fit.model_dump(), params=state.init.params),
        calibration=state.calibration,
        finetune=state.finetune,
        control=state.control_section,
        probing=state.probing,
        plots=state.plots,
        latent_identity=state.identity,
        metrics=state.metrics,
        comparisons=comparison_table(state.metrics, state.paired or {}),
        headline=headline(state.metrics),
        eval_split=EvalSplit(
            model=cfg.model,
            layer=cfg.layer,
            dataset=cfg.data.dataset,
            split="eval",
            eval_fraction=cfg.data.eval_fraction,
            seed=split_seed(cfg),
            ctx_len=state.evals.ctx_len,
            eval_tokens=cfg.data.eval_tokens,
        ),
        notes=state.notes,
        timings_s={**{k: round(v, 2) for k, v in state.timings.items()}, "package": 0.0},
        versions=package_versions(),
    )


def package(state: UpgradeState, ctx: RunContext) -> None:
    """Write the RSAE, ``report.json`` / ``report.html`` and the hub-ready files (``sparsity.safetensors``,
    ``core_eval_results.json``, ``README.md``: :func:`rsae.pipeline.outputs.write_hub_outputs`) to
    ``state.out_dir``; fill ``state.report``.

    ``cfg.json`` and the report name the teacher, data and model as ``ctx.refs`` says (a server's public
    references instead of its folders), else as the request gave them; the cfg's metadata follows SAELens's
    conventions (:func:`rsae.pipeline.outputs.cfg_metadata`).

    Raises:
        NumericalError: the RSAE has non-finite weights (it is not written).
    """
    t0 = time.time()
    teacher, rsae, refs = state.teacher, state.rsae, ctx.refs
    cfg = public_config(state, refs)
    inherited = dict(teacher.metadata)
    if refs is not None and refs.teacher is not None and "source" in inherited:
        inherited["source"] = _without_path(inherited["source"])
    rsae.metadata = cfg_metadata(state, cfg, inherited, teacher_info(state, refs).model_dump(mode="json"))
    bad = [n for n, t in rsae.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:  # never publish a broken SAE as a success
        raise NumericalError(
            f"the upgraded SAE has non-finite values in {bad}; try a lower finetune.lr or "
            "calibrate.lr, or report the teacher",
            field="settings.finetune.lr",
        )
    rsae.cpu().save(state.out_dir)
    _copy_identity(state)
    state.notes += _notes(state)
    data = build_report(state, refs).model_dump(mode="json", by_alias=True)
    _write_html(data, state.out_dir)
    write_hub_outputs(state, cfg, data, rsae.cfg_dict())
    data["timings_s"]["package"] = round(time.time() - t0, 2)
    write_json_atomic(state.out_dir / "report.json", data)
    state.report = data
    ctx.progress.report(
        1.0, {"stage": "package", **{k: v for k, v in data["headline"].items() if v is not None}}, force=True
    )

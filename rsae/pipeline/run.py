"""The upgrade: build the state, run the stages in order, time each, and persist the state after each.

A rerun with the same request and ``work_dir`` (a worker died, the job was re-queued) restores the state
saved after the last finished stage and continues at the next one (:mod:`rsae.pipeline.checkpoints`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import ArtifactRefs, UpgradeConfig
from ..device import pick_device
from .calibrate import calibrate
from .checkpoints import CheckpointCallback, Checkpoints, Fence
from .evaluate import evaluate
from .extract import extract
from .finetune import finetune
from .initialize import initialize
from .package import package
from .progress import Progress, ProgressCallback, RunContext
from .state import UpgradeState, new_state

log = logging.getLogger(__name__)

Stage = Callable[[UpgradeState, RunContext], None]
"""A pipeline stage: reads the state earlier stages filled, fills its own fields."""

PIPELINE: dict[str, Stage] = {
    "extract": extract,
    "init": initialize,
    "calibrate": calibrate,
    "finetune": finetune,
    "evaluate": evaluate,
    "package": package,
}
"""The stages in order (names as :data:`rsae.config.STAGES`)."""

STATE_CHECKPOINT = "state"
"""Name of the checkpoint that holds the state after the last finished stage."""


def _resume(state: UpgradeState, ckpts: Checkpoints) -> None:
    """Restore the state saved after the last finished stage, if any, and announce the resume."""
    snap = ckpts.load(STATE_CHECKPOINT)
    if snap is None:
        return
    state.restore(snap["state"])
    ckpts.reused = list(state.done)
    nxt = next((s for s in PIPELINE if s not in state.done), None)
    log.info("resuming at stage %s (finished: %s)", nxt, state.done)
    ckpts.emit("resumed", {"name": STATE_CHECKPOINT, "stage": nxt, "step": None, "reused": list(state.done)})


def run_stages(state: UpgradeState, ctx: RunContext) -> None:
    """Run every stage of :data:`PIPELINE` not in ``state.done``, in order; time each, record it as done and,
    when ``ctx.checkpoints`` is set, persist the state after it."""
    for name, stage in PIPELINE.items():
        if name in state.done:
            continue
        t0 = time.time()
        ctx.progress.enter(name)
        stage(state, ctx)
        if name != "package":
            state.timings[name] = time.time() - t0
        state.done.append(name)
        if ctx.checkpoints is not None and name != "package":
            ctx.checkpoints.save(STATE_CHECKPOINT, {"state": state.snapshot()}, stage=name)


def run_upgrade(
    cfg: UpgradeConfig,
    out_dir: str | Path,
    *,
    work_dir: str | Path | None = None,
    on_progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    checkpoint_every: int | None = None,
    on_checkpoint: CheckpointCallback | None = None,
    fence: Fence | None = None,
    refs: ArtifactRefs | None = None,
) -> dict[str, Any]:
    """Run the whole upgrade and write the artifact folder.

    Args:
        cfg: the upgrade request.
        out_dir: folder that receives ``sae_weights.safetensors``, ``cfg.json`` (SAELens layout,
            ``architecture: "rational"``), ``report.json`` and ``report.html``. Created if missing. Each file is
            written to a temporary name and renamed, so a reader never sees a half-written file.
        work_dir: scratch folder for activation shards (default: ``out_dir/../work``).
        on_progress: see :class:`rsae.pipeline.progress.ProgressCallback`.
        should_cancel: polled between steps; when it returns True, :class:`rsae.errors.Cancelled` is raised.
        checkpoint_every: if set, keep resumable state in ``work_dir/checkpoints`` (the state after each
            stage; fine-tuning every this many steps; see :class:`rsae.pipeline.checkpoints.Checkpoints`) and
            resume from it: rerunning with the same ``cfg`` and ``work_dir`` after a crash continues where the
            crash left off. None: no checkpoints.
        on_checkpoint: see :data:`rsae.pipeline.checkpoints.CheckpointCallback`.
        fence: called before each checkpoint file is renamed into place; False drops that write (see
            :data:`rsae.pipeline.checkpoints.Fence`: a worker that lost its job must not overwrite the new
            owner's checkpoints).
        refs: how the artifacts name the teacher, the data and the model instead of the local paths in
            ``cfg`` (:class:`rsae.config.ArtifactRefs`; a server passes them so no server folder reaches a
            user). None: the artifacts carry ``cfg`` as given. Not part of the checkpoint key.

    Returns:
        The report as a dict (same content as ``report.json``), including ``metrics`` per SAE.

    Raises:
        rsae.errors.TeacherError, ModelError, DataError: bad inputs (deterministic, do not retry).
        rsae.errors.NumericalError: the upgraded SAE is not finite.
        rsae.errors.Cancelled: cancellation was requested.
    """
    out_dir = Path(out_dir)
    work = Path(work_dir) if work_dir else out_dir.parent / "work"
    dev = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    state = new_state(cfg, out_dir, work, dev)
    ckpts = None
    if checkpoint_every is not None:
        key = hashlib.sha256(state.cfg.model_dump_json().encode()).hexdigest()  # with the hook site resolved
        ckpts = Checkpoints(work / "checkpoints", checkpoint_every, key, on_checkpoint, fence)
        _resume(state, ckpts)
    ctx = RunContext(Progress(on_progress, should_cancel), ckpts, refs)
    run_stages(state, ctx)
    return state.report

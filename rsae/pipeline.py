"""The whole RSAE upgrade, stage by stage: extract -> init -> calibrate -> finetune -> evaluate -> package.

Source: N. Yin and Y. Yu, "Rational Sparse Autoencoder", arXiv 2606.14990 (2026); the project's reading
of it is ``docs/method.md``. This module knows nothing of HTTP, SQL or Celery: the worker calls
:func:`run_upgrade` with callbacks, the CLI calls it with a progress bar.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from .config import STAGES, UpgradeConfig
from .errors import Cancelled

log = logging.getLogger(__name__)

ARTIFACT_FILES: dict[str, tuple[str, str]] = {
    # name -> (kind, content type)
    "sae_weights.safetensors": ("weights", "application/octet-stream"),
    "cfg.json": ("config", "application/json"),
    "report.json": ("report", "application/json"),
    "report.html": ("report", "text/html"),
}
"""Files of an upgraded SAE's artifact folder (SAELens layout plus the evaluation report)."""


class ProgressCallback(Protocol):
    """Called by the pipeline as it runs.

    Args:
        stage: one of :data:`rsae.config.STAGES`.
        progress: overall progress of the whole job in [0, 1].
        metrics: optional dict of scalar metrics just measured (e.g. ``{"step": 100, "mse": 12.3}``).
    """

    def __call__(self, stage: str, progress: float, metrics: dict[str, Any] | None = None) -> None: ...


# Share of total wall time each stage takes on the default settings (measured on the 2-core CPU);
# used to turn per-stage progress into an overall progress fraction.
_STAGE_WEIGHTS = {"extract": 0.25, "init": 0.02, "calibrate": 0.05, "finetune": 0.45, "evaluate": 0.22,
                  "package": 0.01}


CheckpointCallback = Callable[[str, dict[str, Any]], None]
"""``on_checkpoint(kind, info)``: ``kind`` is ``"saved"`` or ``"resumed"``; ``info`` names the checkpoint
(``name``, ``stage``, ``step``; ``"resumed"`` also ``reused``: stages whose outputs were found on disk)."""


class Checkpoints:
    """Resumable state of one upgrade, kept in ``folder`` (the job's work dir / ``checkpoints``).

    Each checkpoint is one file ``<name>.pt`` written by ``torch.save`` to a temporary name in the same
    folder, fsynced and renamed over the old one (``os.replace``, atomic on POSIX), so a worker killed at
    any instant leaves either the previous or the new checkpoint, never a torn one. Files are read with
    ``torch.load(weights_only=True)``: tensors and plain Python values only. A checkpoint written for a
    different request (``key``: sha256 of the config) or unreadable is ignored (training restarts).

    What resumes how (``docs/reliability.md``): extract — the activation folders in the work dir are
    reused when their manifests match; init and calibrate — recomputed (seeded, a few percent of the job,
    the Remez fit comes from its disk cache); finetune — the RSAE and the control each resume at their
    last checkpoint (model, Adam, L0 controller, step, eval curve; every ``every`` steps and at the end);
    evaluate and package — rerun from the fine-tuned weights.

    Args:
        folder: where the files live (created on first save).
        every: optimizer steps between two fine-tuning checkpoints.
        key: identity of the request; checkpoints with another key are not loaded.
        on_event: see :data:`CheckpointCallback`.
    """

    def __init__(self, folder: Path, every: int = 50, key: str = "", on_event: CheckpointCallback | None = None
                 ) -> None:
        self.folder, self.every, self.key, self.on_event = Path(folder), max(1, int(every)), key, on_event

    def path(self, name: str) -> Path:
        """File of checkpoint ``name``."""
        return self.folder / f"{name}.pt"

    def load(self, name: str) -> dict[str, Any] | None:
        """The state saved under ``name``, or None (missing, unreadable, or for another request)."""
        import torch

        f = self.path(name)
        if not f.is_file():
            return None
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a bad checkpoint costs recomputation, never the job
            log.warning("ignoring unreadable checkpoint %s: %s: %s", f, type(e).__name__, e)
            return None
        if not isinstance(state, dict) or state.get("key") != self.key:
            log.warning("ignoring checkpoint %s written for another request", f)
            return None
        return state

    def save(self, name: str, state: dict[str, Any], stage: str = "finetune") -> None:
        """Write ``state`` under ``name`` atomically (temp file + fsync + ``os.replace``)."""
        import torch

        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{name}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as fh:
                torch.save({**state, "key": self.key}, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path(name))
        finally:
            tmp.unlink(missing_ok=True)
        if self.on_event is not None:
            self.on_event("saved", {"name": name, "stage": stage, "step": state.get("step")})

    def train(self, name: str, extra: list[Any] | None = None) -> "_TrainCheckpoint":
        """A :class:`rsae.train.TrainCheckpoint` for the training run ``name``; ``extra`` (e.g. the eval
        curve the caller appends to) is saved with it and restored in place."""
        return _TrainCheckpoint(self, name, extra)


@dataclass
class _TrainCheckpoint:
    """:class:`rsae.train.TrainCheckpoint` of one training run, stored by :class:`Checkpoints`."""

    ckpts: Checkpoints
    name: str
    extra: list[Any] | None

    @property
    def every(self) -> int:
        """Steps between two saves."""
        return self.ckpts.every

    def load(self) -> dict[str, Any] | None:
        """The saved state (``extra`` restored in place; a ``"resumed"`` event emitted), or None."""
        state = self.ckpts.load(self.name)
        if state is None:
            return None
        if self.extra is not None:
            self.extra[:] = list(state.get("extra") or [])
        reused = [s for s in ("extract",) if (self.ckpts.folder.parent / "acts-train" / "manifest.json").is_file()]
        log.info("resuming %s at step %s", self.name, state["step"])
        if self.ckpts.on_event is not None:
            self.ckpts.on_event("resumed", {"name": self.name, "stage": "finetune", "step": int(state["step"]),
                                            "reused": reused})
        return state

    def save(self, state: dict[str, Any]) -> None:
        """Save ``state`` plus a copy of ``extra``."""
        if self.extra is not None:
            state = {**state, "extra": list(self.extra)}
        self.ckpts.save(self.name, state)


@dataclass
class _Progress:
    callback: ProgressCallback | None
    should_cancel: Callable[[], bool] | None
    stage: str = "extract"
    _last: float = field(default=0.0)
    ckpts: Checkpoints | None = None

    def train_checkpoint(self, name: str, extra: list[Any] | None = None) -> "_TrainCheckpoint | None":
        """The fine-tuning checkpoint of run ``name`` (None when checkpointing is off)."""
        return None if self.ckpts is None else self.ckpts.train(name, extra)

    def enter(self, stage: str) -> None:
        self.stage = stage
        self.report(0.0)

    def report(self, frac: float, metrics: dict[str, Any] | None = None, *, force: bool = False) -> None:
        """Report progress ``frac`` in [0, 1] within the current stage; checks for cancellation."""
        if self.should_cancel is not None and self.should_cancel():
            raise Cancelled(f"cancelled during stage {self.stage}")
        if self.callback is None:
            return
        now = time.monotonic()
        if not force and metrics is None and frac not in (0.0, 1.0) and now - self._last < 0.5:
            return
        self._last = now
        before = sum(_STAGE_WEIGHTS[s] for s in STAGES[: STAGES.index(self.stage)])
        overall = min(1.0, before + _STAGE_WEIGHTS[self.stage] * max(0.0, min(1.0, frac)))
        self.callback(self.stage, overall, metrics)


def run_upgrade(
    cfg: UpgradeConfig,
    out_dir: str | Path,
    *,
    work_dir: str | Path | None = None,
    on_progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    checkpoint_every: int | None = None,
    on_checkpoint: CheckpointCallback | None = None,
) -> dict[str, Any]:
    """Run the whole upgrade and write the artifact folder.

    Args:
        cfg: the upgrade request.
        out_dir: folder that receives ``sae_weights.safetensors``, ``cfg.json`` (SAELens layout,
            ``architecture: "rational"``), ``report.json`` and ``report.html``. Created if missing. Each file is written to
            a temporary name and renamed, so a reader never sees a half-written file.
        work_dir: scratch folder for activation shards (default: ``out_dir/../work``).
        on_progress: see :class:`ProgressCallback`.
        should_cancel: polled between steps; when it returns True, :class:`rsae.errors.Cancelled` is raised.
        checkpoint_every: if set, keep resumable state in ``work_dir/checkpoints`` (fine-tuning every this
            many steps; see :class:`Checkpoints`) and resume from it: rerunning with the same ``cfg`` and
            ``work_dir`` after a crash continues where the crash left off. None: no checkpoints.
        on_checkpoint: see :data:`CheckpointCallback`.

    Returns:
        The report as a dict (same content as ``report.json``), including ``metrics`` per SAE.

    Raises:
        rsae.errors.TeacherError, ModelError, DataError: bad inputs (deterministic, do not retry).
        rsae.errors.Cancelled: cancellation was requested.
    """
    from . import stages  # heavy imports (torch, transformers) only when a job runs

    out_dir = Path(out_dir)
    work = Path(work_dir) if work_dir else out_dir.parent / "work"
    ckpts = None
    if checkpoint_every is not None:
        key = hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()
        ckpts = Checkpoints(work / "checkpoints", checkpoint_every, key, on_checkpoint)
    return stages.run(cfg, out_dir, work, _Progress(on_progress, should_cancel, ckpts=ckpts))


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` via a temporary file, fsync and ``os.replace`` (atomic on POSIX)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as fh:
            fh.write(json.dumps(obj, indent=2, sort_keys=False))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

"""Resumable state of one upgrade on disk: fine-tuning checkpoints and the state after each finished stage.

Each checkpoint is one file written to a temporary name in the same folder, fsynced and renamed over the old
one (``os.replace``, atomic on POSIX), so a worker killed at any instant leaves either the previous or the
new checkpoint, never a torn one. ``docs/reliability.md`` describes what resumes how.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)


Fence = Callable[[], bool]
"""``fence()``: called right before a checkpoint is renamed into place; False means "this run no longer owns
the work dir" (e.g. its lease was lost): the new file is dropped and the old one is left untouched."""


def temp_name(path: Path) -> Path:
    """A temporary name beside ``path``, unique to this write (``.<name>.<32 hex>.tmp``): concurrent
    writers (threads, processes, machines sharing the folder) never write to one temp file."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


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

    What resumes how (``docs/reliability.md``): after every finished stage the runner saves the typed state
    (``"state"``, :meth:`rsae.pipeline.state.UpgradeState.snapshot`), and a rerun continues at the first
    unfinished stage; within finetune, the RSAE and the control each resume at their last checkpoint (model,
    Adam, L0 controller, step, eval curve; every ``every`` steps and at the end); the activation folders are
    also reused on their own when their manifests match.

    Args:
        folder: where the files live (created on first save).
        every: optimizer steps between two fine-tuning checkpoints.
        key: identity of the request; checkpoints with another key are not loaded.
        on_event: see :data:`CheckpointCallback`.
        fence: see :data:`Fence` (the service passes a SQL check that the job's lease is still held, so a
            worker that lost its lease cannot overwrite the new owner's checkpoints). None: always write.
    """

    def __init__(
        self,
        folder: Path,
        every: int = 50,
        key: str = "",
        on_event: CheckpointCallback | None = None,
        fence: Fence | None = None,
    ) -> None:
        self.folder, self.every, self.key, self.on_event = Path(folder), max(1, int(every)), key, on_event
        self.fence = fence
        self.reused: list[str] = []
        """Stages whose outputs this run took from disk instead of recomputing them (set by the runner)."""

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

    def save(self, name: str, state: dict[str, Any], stage: str = "finetune") -> bool:
        """Write ``state`` under ``name`` atomically (unique temp file + fsync + ``fence()`` + ``os.replace``).

        Returns:
            True if written; False if the fence refused (nothing changed on disk, no ``saved`` event).
        """
        import torch

        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = temp_name(self.path(name))
        try:
            with open(tmp, "wb") as fh:
                torch.save({**state, "key": self.key}, fh)
                fh.flush()
                os.fsync(fh.fileno())
            if self.fence is not None and not self.fence():
                log.warning("checkpoint %s not written: the fence refused (this run lost the work dir)", name)
                return False
            os.replace(tmp, self.path(name))
        finally:
            tmp.unlink(missing_ok=True)
        self.emit("saved", {"name": name, "stage": stage, "step": state.get("step")})
        return True

    def emit(self, kind: str, info: dict[str, Any]) -> None:
        """Send ``(kind, info)`` to ``on_event`` when one is set."""
        if self.on_event is not None:
            self.on_event(kind, info)

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
        log.info("resuming %s at step %s", self.name, state["step"])
        self.ckpts.emit(
            "resumed",
            {"name": self.name, "stage": "finetune", "step": int(state["step"]), "reused": list(self.ckpts.reused)},
        )
        return state

    def save(self, state: dict[str, Any]) -> None:
        """Save ``state`` plus a copy of ``extra``."""
        if self.extra is not None:
            state = {**state, "extra": list(self.extra)}
        self.ckpts.save(self.name, state)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` via a temporary file, fsync and ``os.replace`` (atomic on POSIX)."""
    tmp = temp_name(path)
    try:
        with open(tmp, "w") as fh:
            fh.write(json.dumps(obj, indent=2, sort_keys=False))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

"""Progress of one upgrade: per-stage fractions turned into the job's overall progress; cancellation."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from ..config import STAGES
from ..errors import Cancelled

# Share of total wall time each stage takes on the default settings (measured on the 2-core CPU);
# used to turn per-stage progress into an overall progress fraction.
STAGE_WEIGHTS = {"extract": 0.25, "init": 0.02, "calibrate": 0.05, "finetune": 0.45, "evaluate": 0.22, "package": 0.01}


class ProgressCallback(Protocol):
    """Called by the pipeline as it runs.

    Args:
        stage: one of :data:`rsae.config.STAGES`.
        progress: overall progress of the whole job in [0, 1].
        metrics: optional dict of scalar metrics just measured (e.g. ``{"step": 100, "mse": 12.3}``).
    """

    def __call__(self, stage: str, progress: float, metrics: dict[str, Any] | None = None) -> None: ...


@dataclass
class Progress:
    """Turns per-stage progress into the job's overall progress, throttled, and checks for cancellation.

    Args:
        callback: see :class:`ProgressCallback` (None: progress is not reported).
        should_cancel: polled on every report; True raises :class:`rsae.errors.Cancelled`.
    """

    callback: ProgressCallback | None = None
    should_cancel: Callable[[], bool] | None = None
    stage: str = "extract"
    _last: float = field(default=0.0)

    def enter(self, stage: str) -> None:
        """Start ``stage`` (one of :data:`rsae.config.STAGES`): report 0 within it."""
        self.stage = stage
        self.report(0.0)

    def within(self, lo: float, hi: float) -> Callable[[float], None]:
        """A callback mapping a sub-task's fraction f in [0, 1] to ``lo + (hi - lo) f`` of the current stage."""
        return lambda f: self.report(lo + (hi - lo) * f)

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
        before = sum(STAGE_WEIGHTS[s] for s in STAGES[: STAGES.index(self.stage)])
        overall = min(1.0, before + STAGE_WEIGHTS[self.stage] * max(0.0, min(1.0, frac)))
        self.callback(self.stage, overall, metrics)


@dataclass
class RunContext:
    """What a stage may use besides the state: progress reporting (and cancellation) and, when the run
    keeps them, fine-tuning checkpoints (:class:`rsae.pipeline.checkpoints.Checkpoints`)."""

    progress: Progress = field(default_factory=Progress)
    checkpoints: Any = None
    refs: Any = None
    """How the artifacts name the inputs (:class:`rsae.config.ArtifactRefs`), or None: as in the config."""

    def train_checkpoint(self, name: str, extra: list[Any] | None = None) -> Any:
        """The checkpoint of training run ``name`` (:class:`rsae.train.TrainCheckpoint`), or None when the
        run keeps no checkpoints."""
        return None if self.checkpoints is None else self.checkpoints.train(name, extra)

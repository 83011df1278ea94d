"""The whole RSAE upgrade, stage by stage: extract -> init -> calibrate -> finetune -> evaluate -> package.

Source: N. Yin and Y. Yu, "Rational Sparse Autoencoder", arXiv 2606.14990 (2026); the project's reading
of it is ``docs/method.md``. This module knows nothing of HTTP, SQL or Celery: the worker calls
:func:`run_upgrade` with callbacks, the CLI calls it with a progress bar.
"""

from __future__ import annotations

import json
import logging
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


@dataclass
class _Progress:
    callback: ProgressCallback | None
    should_cancel: Callable[[], bool] | None
    stage: str = "extract"
    _last: float = field(default=0.0)

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

    Returns:
        The report as a dict (same content as ``report.json``), including ``metrics`` per SAE.

    Raises:
        rsae.errors.TeacherError, ModelError, DataError: bad inputs (deterministic, do not retry).
        rsae.errors.Cancelled: cancellation was requested.
    """
    from . import stages  # heavy imports (torch, transformers) only when a job runs

    return stages.run(cfg, Path(out_dir), Path(work_dir) if work_dir else None,
                      _Progress(on_progress, should_cancel))


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` via a temporary file and ``os.replace`` (atomic on POSIX)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False))
    tmp.replace(path)

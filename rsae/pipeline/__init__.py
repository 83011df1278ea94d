"""The whole RSAE upgrade, one module per stage: extract -> init -> calibrate -> finetune -> evaluate -> package.

Source: N. Yin and Y. Yu, "Rational Sparse Autoencoder", arXiv 2606.14990 (2026); the project's reading
of it is ``docs/method.md``. This package knows nothing of HTTP, SQL or Celery: the worker calls
:func:`run_upgrade` with callbacks, the CLI calls it with a progress bar.

- :mod:`~rsae.pipeline.run`: :func:`run_upgrade`, the stage order (:data:`~rsae.pipeline.run.PIPELINE`).
- :mod:`~rsae.pipeline.state`: :class:`~rsae.pipeline.state.UpgradeState`, all one stage hands the next.
- :mod:`~rsae.pipeline.progress`, :mod:`~rsae.pipeline.checkpoints`: progress, cancellation, resumable state.
- one module per stage: :mod:`~rsae.pipeline.extract`, :mod:`~rsae.pipeline.initialize`,
  :mod:`~rsae.pipeline.calibrate`, :mod:`~rsae.pipeline.finetune`, :mod:`~rsae.pipeline.evaluate`,
  :mod:`~rsae.pipeline.package`; each is ``stage(state, ctx)``.
"""

from .checkpoints import CheckpointCallback, Checkpoints, write_json_atomic
from .package import ARTIFACT_FILES
from .progress import Progress, ProgressCallback, RunContext
from .run import PIPELINE, run_stages, run_upgrade
from .state import UpgradeState, new_state

__all__ = [
    "ARTIFACT_FILES",
    "PIPELINE",
    "CheckpointCallback",
    "Checkpoints",
    "Progress",
    "ProgressCallback",
    "RunContext",
    "UpgradeState",
    "new_state",
    "run_stages",
    "run_upgrade",
    "write_json_atomic",
]

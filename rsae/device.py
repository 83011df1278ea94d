"""Device selection. Never touches CUDA at import time (safe before a Celery prefork)."""

from __future__ import annotations

import os


def pick_device(requested: str | None = None) -> str:
    """The torch device to use: ``requested``, else ``$RSAE_DEVICE``, else ``cuda`` if available, else ``cpu``.

    CUDA is only queried when this is called (inside a job, after any fork).
    """
    dev = requested or os.environ.get("RSAE_DEVICE")
    if dev:
        return dev
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"

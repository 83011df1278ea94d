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


def device_label(device: str) -> str:
    """The name a measured throughput is filed under: ``"cpu"`` for a CPU device, ``"cuda:<GPU name>"`` (e.g.
    ``"cuda:NVIDIA H100 80GB HBM3"``) for a CUDA device (``"cuda"`` or ``"cuda:<index>"``), else ``device``
    unchanged. Queries CUDA only for a CUDA device (call it inside a job, after any fork)."""
    if device.split(":")[0] == "cpu":
        return "cpu"
    if device.split(":")[0] != "cuda":
        return device
    import torch

    index = int(device.split(":")[1]) if ":" in device and device.split(":")[1].isdigit() else 0
    try:
        return f"cuda:{torch.cuda.get_device_name(index)}"
    except (RuntimeError, AssertionError, ValueError):  # no CUDA here after all
        return device

"""Versions of the installed packages that shape an upgrade's numbers, recorded in reports and cfgs."""

from __future__ import annotations

import importlib.metadata

REQUIRED_PACKAGES: tuple[str, ...] = ("rsae-service", "torch", "transformers", "scipy", "safetensors", "numpy")
"""Always reported; ``"unknown"`` when the distribution's metadata cannot be found."""
OPTIONAL_PACKAGES: tuple[str, ...] = ("huggingface-hub", "sae-lens", "eai-sparsify", "dictionary-learning")
"""Reported only when installed (the teacher formats' own libraries and the hub client)."""


def package_versions() -> dict[str, str]:
    """Distribution name -> installed version, read from the package metadata (nothing is imported).

    Returns:
        Every name of :data:`REQUIRED_PACKAGES` (``"unknown"`` when not installed), then those of
        :data:`OPTIONAL_PACKAGES` that are installed, in that order.
    """
    out: dict[str, str] = {}
    for dist in (*REQUIRED_PACKAGES, *OPTIONAL_PACKAGES):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            if dist in REQUIRED_PACKAGES:
                out[dist] = "unknown"
    return out

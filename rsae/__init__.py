"""rsae: Rational Sparse Autoencoders (Yin & Yu 2026, arXiv 2606.14990) as a library.

Upgrade a pretrained SAE's fixed gate (ReLU, ...) to a trainable rational function P(t)/Q(t), initialised
by a relaxed Remez fit, calibrated on real pre-activations, then fine-tuned. Load an upgraded SAE with
``rsae.load(folder)`` and call ``encode`` / ``decode`` / ``forward``.

Heavy modules (torch, transformers) are imported lazily so that ``rsae.config`` and ``rsae.errors`` stay
cheap for the HTTP service.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "load": ("rsae.saes", "load_sae"),
    "load_sae": ("rsae.saes", "load_sae"),
    "SAE": ("rsae.saes", "SAE"),
    "ReLUSAE": ("rsae.saes", "ReLUSAE"),
    "RationalSAE": ("rsae.saes", "RationalSAE"),
    "RationalGate": ("rsae.saes", "RationalGate"),
    "register_family": ("rsae.saes", "register_family"),
    "UpgradeConfig": ("rsae.config", "UpgradeConfig"),
    "run_upgrade": ("rsae.pipeline", "run_upgrade"),
    "remez_fit": ("rsae.remez", "remez_fit"),
    "train_teacher_from_text": ("rsae.teacher", "train_teacher_from_text"),
}

if TYPE_CHECKING:  # pragma: no cover
    from .config import UpgradeConfig
    from .pipeline import run_upgrade
    from .remez import remez_fit
    from .saes import SAE, RationalGate, RationalSAE, ReLUSAE, load_sae, register_family
    from .saes import load_sae as load
    from .teacher import train_teacher_from_text


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        module = importlib.import_module(mod)
        return getattr(module, attr)
    raise AttributeError(f"module 'rsae' has no attribute {name!r}")


__all__ = [  # noqa: F822 - resolved lazily by __getattr__
    "RationalGate",
    "RationalSAE",
    "ReLUSAE",
    "SAE",
    "UpgradeConfig",
    "load",
    "load_sae",
    "register_family",
    "remez_fit",
    "run_upgrade",
    "train_teacher_from_text",
]
assert set(__all__) == set(_LAZY)

"""ReLU family: the standard SAE (SAELens ``architecture: "standard"``; Bricken et al. 2023, "Towards
Monosemanticity"; Anthropic's April 2024 update), ``z = relu(h)``.

Trained with MSE + lambda * sum_j |z_j| ||W_dec[j]|| (:func:`rsae.saes.family.sae_loss`). Its gate has a
kink, not a jump, at 0: the Remez target is g(t) = relu(t) on [-1, 1] with no margin, degrees (5, 4)
(why not (3, 2): ``docs/method.md``); all latents share the gate (no per-latent scale).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from .base import SAE, is_finite_number
from .family import Family, JumpRule, register_family


class ReLUSAE(SAE):
    """Standard ReLU SAE (SAELens ``architecture: "standard"``): ``z = relu(h)``."""

    architecture = "standard"
    family = "relu"

    def gate(self, h: torch.Tensor) -> torch.Tensor:
        """``relu(h)``, [..., d_sae] -> [..., d_sae]."""
        return torch.relu(h)


class ReLUFamily(Family):
    """The ReLU family: continuous gate, one shared rational, lambda from the teacher's cfg when recorded."""

    name = "relu"
    sae_class = ReLUSAE
    aliases = ("relu",)
    degrees = (5, 4)
    default_coefficient = 10.0

    def remez_target(self, c: float) -> Callable[[np.ndarray], np.ndarray]:
        """g(t) = relu(t) (H(0) = 0).

        Raises:
            ValueError: ``c`` != 0 (ReLU has its kink at t = 0).
        """
        if c != 0:
            raise ValueError("ReLU has its kink at t = 0; c must be 0")
        return super().remez_target(0.0)

    def remez_defaults(self, c: float | None = None) -> dict[str, Any]:
        """c = 0, margin = 0 (continuous target), degrees (5, 4).

        Raises:
            ValueError: ``c`` given and != 0.
        """
        if c not in (None, 0, 0.0):
            raise ValueError("ReLU has its kink at t = 0; c must be 0")
        p, q = self.degrees
        return dict(c=0.0, margin=0.0, p=p, q=q)

    def jump_rule(self, teacher: SAE, h: torch.Tensor, remez: Any) -> JumpRule:
        """No jump: the gate is continuous at 0 (``theta`` None)."""
        return JumpRule(None, {"rule": "ReLU: jump at 0"})

    def teacher_l1(self, teacher: SAE) -> tuple[float, str] | None:
        """The teacher's training lambda from its cfg (``metadata.l1_coefficient``), when recorded."""
        lam = teacher.metadata.get("l1_coefficient")
        if is_finite_number(lam):
            return float(lam), "teacher cfg metadata.l1_coefficient"
        return None

    def new_teacher(self, d_in: int, d_sae: int, *, k: int, coefficient: float, metadata: dict[str, Any]) -> SAE:
        """A ReLU SAE whose metadata records its L1 coefficient and penalty."""
        return ReLUSAE(
            d_in,
            d_sae,
            metadata={**metadata, "l1_coefficient": coefficient, "sparsity_penalty": "sum_j |z_j| * ||W_dec[j]||"},
        )


RELU = register_family(ReLUFamily())
"""The registered ReLU family."""

"""JumpReLU family (SAELens ``architecture: "jumprelu"``; Rajamanoharan et al. 2024, "Jumping Ahead:
Improving Reconstruction Fidelity with JumpReLU Sparse Autoencoders"; Gemma Scope):
``z_j = h_j * H(h_j - theta_j)`` with a per-latent threshold theta [d_sae] > 0.

Training loss: MSE + lambda * L0, L0 = sum_j H(h_j - theta_j) with the straight-through kernel estimator
for theta (eq. 9-12 of the paper). The RSAE reproduces the gate with one rational whose jump sits at the
anchor a of the unit interval and a per-latent scale s_j = theta_j / a (``rsae.pipeline.initialize``); its
compute-matched control keeps the family's own L0 penalty so that its L0 can be held at the RSAE's target.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..errors import TeacherError
from .base import SAE, WEIGHTS_NAME, is_finite_number, mse_l0_objective
from .family import Family, Objective, register_family

JUMPRELU_INIT_THRESHOLD = 1.0
"""Initial theta of a JumpReLU teacher trained by :mod:`rsae.teacher`, units of h."""
JUMPRELU_BANDWIDTH = 0.5
"""Kernel bandwidth of the straight-through estimator of a teacher trained by :mod:`rsae.teacher`, units of h."""


class _JumpReLUFn(torch.autograd.Function):
    """z = h * H(h - theta) with the straight-through kernel estimator for theta.

    Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU Sparse
    Autoencoders", eq. 11: dz/dh = H(h - theta); dz/dtheta = -(theta / eps) K((h - theta) / eps) with the
    rectangle kernel K(u) = 1[|u| < 1/2]. h: [..., d_sae], theta: [d_sae], eps: bandwidth in units of h.
    """

    @staticmethod
    def forward(ctx, h, theta, eps: float):
        ctx.save_for_backward(h, theta)
        ctx.eps = eps
        return h * (h > theta)

    @staticmethod
    def backward(ctx, g):
        h, theta = ctx.saved_tensors
        eps = ctx.eps
        gh = g * (h > theta)
        kern = ((h - theta).abs() < eps / 2).to(g.dtype)
        gt = -(theta / eps) * (g * kern)
        return gh, gt.reshape(-1, theta.shape[-1]).sum(0), None


class _StepFn(torch.autograd.Function):
    """H(h - theta) with the straight-through kernel estimator (Rajamanoharan et al. 2024, eq. 12):
    d/dh = 0; d/dtheta = -(1 / eps) K((h - theta) / eps). Used for the L0 penalty of JumpReLU training."""

    @staticmethod
    def forward(ctx, h, theta, eps: float):
        ctx.save_for_backward(h, theta)
        ctx.eps = eps
        return (h > theta).to(h.dtype)

    @staticmethod
    def backward(ctx, g):
        h, theta = ctx.saved_tensors
        eps = ctx.eps
        kern = ((h - theta).abs() < eps / 2).to(g.dtype)
        gt = -(1.0 / eps) * (g * kern)
        return None, gt.reshape(-1, theta.shape[-1]).sum(0), None


class JumpReLUSAE(SAE):
    """JumpReLU SAE (SAELens ``architecture: "jumprelu"``; Rajamanoharan et al. 2024; Gemma Scope):
    ``z_j = h_j * H(h_j - theta_j)`` with a per-latent threshold ``theta`` [d_sae] > 0.

    ``theta`` is stored as ``threshold`` in the weights file (SAELens layout) and trained as
    ``log_threshold`` so it stays positive. ``bandwidth`` (cfg ``jumprelu_bandwidth``, units of h) is the
    kernel width of the straight-through estimator used when training (:class:`_JumpReLUFn`).
    """

    architecture = "jumprelu"
    family = "jumprelu"

    def __init__(self, d_in: int, d_sae: int, *, bandwidth: float = 0.05, **kw: Any) -> None:
        super().__init__(d_in, d_sae, **kw)
        self.bandwidth = float(bandwidth)
        self.log_threshold = nn.Parameter(torch.zeros(self.d_sae))

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """:meth:`SAE.init_weights`, and every threshold at :data:`JUMPRELU_INIT_THRESHOLD`."""
        super().init_weights(generator)
        self.log_threshold.fill_(math.log(JUMPRELU_INIT_THRESHOLD))

    @property
    def threshold(self) -> torch.Tensor:
        """theta = exp(log_threshold), [d_sae], units of h."""
        return self.log_threshold.exp()

    def gate(self, h: torch.Tensor) -> torch.Tensor:
        """``h * H(h - theta)`` [..., d_sae] -> [..., d_sae]; straight-through gradient for theta."""
        return _JumpReLUFn.apply(h, self.threshold, self.bandwidth)

    def step(self, h: torch.Tensor) -> torch.Tensor:
        """``H(h - theta)`` [..., d_sae] with the straight-through gradient for theta (L0 penalty)."""
        return _StepFn.apply(h, self.threshold, self.bandwidth)

    def cfg_dict(self) -> dict[str, Any]:
        """SAELens cfg plus ``jumprelu_bandwidth``."""
        return {**super().cfg_dict(), "jumprelu_bandwidth": self.bandwidth}

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """``threshold`` [d_sae] (SAELens name)."""
        return {"threshold": self.threshold}

    @classmethod
    def from_parts(cls, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "JumpReLUSAE":
        """Build from cfg + tensors; requires a finite, positive ``threshold`` [d_sae].

        Raises:
            TeacherError: missing, misshapen, non-finite or non-positive threshold; bad bandwidth.
        """
        th = tensors.get("threshold")
        if th is None or tuple(th.shape) != (cfg["d_sae"],) or not th.is_floating_point():
            raise TeacherError(
                f"a jumprelu SAE needs a float tensor 'threshold' of shape [{cfg['d_sae']}]",
                field=f"{WEIGHTS_NAME}.threshold",
            )
        if not torch.isfinite(th).all() or (th <= 0).any():
            raise TeacherError("tensor 'threshold' must be finite and > 0", field=f"{WEIGHTS_NAME}.threshold")
        bw = cfg.get("jumprelu_bandwidth", 0.05)
        if not is_finite_number(bw) or bw <= 0:
            raise TeacherError(
                "cfg.json 'jumprelu_bandwidth' must be a positive number", field="cfg.json.jumprelu_bandwidth"
            )
        sae = super().from_parts(cfg, tensors, bandwidth=float(bw))
        with torch.no_grad():
            sae.log_threshold.copy_(th.float().log())
        return sae


def jumprelu_l0_loss(sae: SAE, x: torch.Tensor, lam: float) -> tuple[torch.Tensor, dict[str, float]]:
    """JumpReLU objective MSE + lam * L0 (Rajamanoharan et al. 2024, eq. 9) on x [n, d_in], with the
    straight-through kernel estimator for the thresholds; ``sae`` is a :class:`JumpReLUSAE`."""
    h = sae.pre_acts(x)
    return mse_l0_objective(sae, x, sae.gate(h), sae.step(h).sum(-1).mean(), lam)


class JumpReLUFamily(Family):
    """The JumpReLU family: per-latent jumps at the teacher's thresholds (the :class:`Family` defaults),
    its own L0 objective for the control and for teacher training, thresholds at the threshold rate."""

    name = "jumprelu"
    sae_class = JumpReLUSAE
    degrees = (9, 8)
    default_coefficient = 5.0

    def control_objective(self, teacher: SAE, lam: float, lam_source: str) -> Objective:
        """MSE + mu * L0 (:func:`jumprelu_l0_loss`, the family's own penalty, Rajamanoharan et al. 2024), mu
        starting at the teacher's ``metadata.l0_coefficient`` (else the RSAE's lambda ``lam``), then adapted
        by the same L0 controller as the RSAE's lambda. Why not L1: ``docs/method.md`` (control objective)."""
        mu = teacher.metadata.get("l0_coefficient")
        mu = float(mu) if isinstance(mu, (int, float)) and mu > 0 else float(lam)
        return Objective(
            jumprelu_l0_loss,
            mu,
            "MSE + mu * L0 (straight-through kernel estimator for the thresholds; the JumpReLU "
            "family's own penalty), mu from the teacher's l0_coefficient, adapted to the same L0 "
            "target as the RSAE",
        )

    def threshold_parameters(self, sae: SAE) -> list[nn.Parameter]:
        """``[log_threshold]``."""
        return [sae.log_threshold]

    def new_teacher(self, d_in: int, d_sae: int, *, k: int, coefficient: float, metadata: dict[str, Any]) -> SAE:
        """A JumpReLU SAE (bandwidth :data:`JUMPRELU_BANDWIDTH`) with thresholds at
        :data:`JUMPRELU_INIT_THRESHOLD` once ``init_weights`` has run (see :meth:`JumpReLUSAE.init_weights`)."""
        return JumpReLUSAE(
            d_in,
            d_sae,
            bandwidth=JUMPRELU_BANDWIDTH,
            metadata={**metadata, "l0_coefficient": coefficient, "sparsity_penalty": "L0 (straight-through)"},
        )

    def train_teacher_objective(self, sae: SAE, batch_size: int):
        """:func:`jumprelu_l0_loss`."""
        return jumprelu_l0_loss

    def teacher_param_groups(self, sae: SAE, lr: float) -> list[dict[str, Any]] | None:
        """Thresholds move in log space: they get 10x the learning rate."""
        return [
            {"params": [p for n, p in sae.named_parameters() if n != "log_threshold"], "lr": lr},
            {"params": [sae.log_threshold], "lr": 10 * lr},
        ]


JUMPRELU = register_family(JumpReLUFamily())
"""The registered JumpReLU family."""

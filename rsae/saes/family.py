"""What the upgrade asks of a teacher gate family, and the registry that answers by name.

A family (ReLU, JumpReLU, TopK, or one a user registers) bundles everything that differs between gates:
its SAE class (forward, ``cfg.json`` layout), its own training loss, where its gate jumps on real
pre-activations (its threshold rule), the Remez target and default degrees of the scalar gate the RSAE
fits, how the RSAE's sparsity is held during fine-tuning, and the objective of its compute-matched
control. The pipeline (:mod:`rsae.pipeline`) only calls these methods; it never checks a family's type.
Modelled on SAELens's ``register_sae_class`` (``sae_lens/registry.py``).

To add a family: subclass :class:`Family` in its own module, set ``name`` and ``sae_class``, override what
differs from the defaults, and call :func:`register_family` (which also registers the SAE class's
``cfg.json`` architecture). ``docs/architecture.md`` walks through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from ..errors import TeacherError
from .base import SAE, decoder_norm_l1, register_architecture

DEFAULT_C = 0.25
"""Default jump position c of a jump family's Remez target on the unit interval (t = 1 is h = theta / c = 4 theta)."""
MARGIN_RHO = 0.1
"""Default relative margin of the Remez fit around a jump at c: delta = MARGIN_RHO * c (``docs/remez.md``)."""

LossFn = Callable[[SAE, torch.Tensor, float], tuple[torch.Tensor, dict[str, float]]]
"""``loss_fn(sae, x, coefficient) -> (loss, parts)``: a training objective on a batch x [n, d_in]; ``parts``
holds floats (at least ``loss``, ``mse``, ``l0``)."""


def sae_loss(sae: SAE, x: torch.Tensor, l1_coefficient: float) -> tuple[torch.Tensor, dict[str, float]]:
    """MSE + lambda * decoder-norm-weighted L1 on a batch x [n, d_in], and its parts (mse, l1, l0) as floats.

    MSE in squared activation units per token; the penalty is :func:`rsae.saes.base.decoder_norm_l1`
    (Anthropic, "Update on dictionary learning improvements", April 2024; SAELens
    ``scale_sparsity_penalty_by_decoder_norm``).
    """
    z = sae.encode(x)
    x_hat = sae.decode(z)
    mse = (x - x_hat).pow(2).sum(-1).mean()
    l1 = decoder_norm_l1(z, sae.W_dec)
    loss = mse + l1_coefficient * l1
    return loss, {"loss": loss.item(), "mse": mse.item(), "l1": l1.item(), "l0": (z != 0).sum(-1).float().mean().item()}


@dataclass
class Objective:
    """A training objective: ``loss_fn`` (None: :func:`sae_loss`), its starting ``coefficient`` and a
    one-line description for the report."""

    loss_fn: LossFn | None
    coefficient: float
    description: str


@dataclass
class JumpRule:
    """Where a teacher's gate jumps on real pre-activations ``h`` [n, d_sae].

    Attributes:
        theta: None (continuous gate, jump at 0: ReLU), per-latent thresholds [d_sae], or per-token
            thresholds [n, 1] (units of h), broadcastable against ``h``.
        info: how ``theta`` was chosen, for the report (``rule`` plus family-specific numbers).
        rational: entries the RSAE's ``cfg.json`` ``rational`` block needs to reproduce the rule at
            inference (e.g. TopK's ``topk_k``, ``topk_cap``); empty when per-latent scales suffice.
        rank_capped: True when the teacher's own rank rule bounds the RSAE's active set (TopK cap): the
            calibration then fits the selected entries, the floor is 0 and fine-tuning needs no sparsity term.
    """

    theta: torch.Tensor | None
    info: dict[str, Any]
    rational: dict[str, Any] = field(default_factory=dict)
    rank_capped: bool = False

    @property
    def per_token(self) -> bool:
        """True when ``theta`` is one threshold per token ([n, 1])."""
        return self.theta is not None and self.theta.dim() == 2


class Family:
    """Base class of a teacher gate family; defaults describe a gate with a per-latent jump (JumpReLU-like).

    Class attributes:
        name: family name (``cfg.json`` ``metadata.family``, the request's ``family``).
        sae_class: the :class:`rsae.saes.base.SAE` subclass; its ``architecture`` is registered on
            :func:`register_family`.
        aliases: further ``cfg.json`` architecture names loaded as ``sae_class`` (e.g. ``"relu"``).
        degrees: default Remez degrees (p, q) of the rational gate fitted to this family's gate.
        default_coefficient: sparsity coefficient of :meth:`train_teacher_objective` when none is given.
    """

    name: ClassVar[str] = "base"
    sae_class: ClassVar[type[SAE]] = SAE
    aliases: ClassVar[tuple[str, ...]] = ()
    degrees: ClassVar[tuple[int, int]] = (9, 8)
    default_coefficient: ClassVar[float] = 0.0

    # -- Remez target and defaults -------------------------------------------------------------------
    def remez_target(self, c: float) -> Callable[[np.ndarray], np.ndarray]:
        """Scalar target g on the unit interval: g(t) = t * H(t - c), a jump of size c at t = c (H(0) = 0).

        Returns a vectorised g: array -> float64 array of the same shape.
        """
        cc = float(c)
        return lambda t: np.where(np.asarray(t, dtype=np.float64) > cc, np.asarray(t, dtype=np.float64), 0.0)

    def remez_defaults(self, c: float | None = None) -> dict[str, Any]:
        """Default Remez inputs ``dict(c, margin, p, q)``: jump at ``c`` (default
        :data:`DEFAULT_C`), margin :data:`MARGIN_RHO` ``* c``, degrees :attr:`degrees`
        (``docs/remez.md`` has the measured trade-offs).

        Raises:
            ValueError: c outside (0, 1).
        """
        cc = DEFAULT_C if c is None else float(c)
        if not 0.0 < cc < 1.0:
            raise ValueError(f"jump position c={cc} must lie in (0, 1)")
        p, q = self.degrees
        return dict(c=cc, margin=MARGIN_RHO * cc, p=p, q=q)

    # -- the upgrade --------------------------------------------------------------------------------
    def check_teacher(self, teacher: SAE) -> None:
        """Raise :class:`rsae.errors.TeacherError` when ``teacher`` cannot be upgraded as this family."""
        if not isinstance(teacher, self.sae_class):
            raise TeacherError(
                f"teacher is a {type(teacher).__name__}, not a {self.sae_class.__name__}", field="teacher"
            )

    def jump_rule(self, teacher: SAE, h: torch.Tensor, remez: Any) -> JumpRule:
        """Where ``teacher``'s gate jumps on real pre-activations ``h`` [n, d_sae]; ``remez`` is the request's
        :class:`rsae.config.RemezConfig`. Default: the teacher's per-latent ``threshold`` [d_sae]."""
        return JumpRule(teacher.threshold.detach().clone(), {"rule": "teacher's per-latent thresholds"})

    def teacher_l1(self, teacher: SAE) -> tuple[float, str] | None:
        """The teacher's own L1 coefficient and where it came from, when the RSAE's fine-tuning should start
        from it; None: the pipeline's automatic lambda. Default None."""
        return None

    def control_objective(self, teacher: SAE, lam: float, lam_source: str) -> Objective:
        """Objective of the compute-matched control (the teacher fine-tuned with its own gate).

        Default: the RSAE's objective, MSE + ``lam`` * decoder-norm-weighted L1 (``lam_source``: where the
        RSAE's lambda came from), adapted by the same L0 controller.
        """
        return Objective(
            None, float(lam), f"MSE + lambda * sum_j |z_j| ||W_dec[j]|| (as the RSAE; lambda: {lam_source})"
        )

    def threshold_parameters(self, sae: SAE) -> list[torch.nn.Parameter]:
        """Parameters of ``sae`` (of this family) trained at the threshold learning rate; default none."""
        return []

    def notes(self, teacher: SAE, thresholds: dict[str, Any]) -> list[str]:
        """Report notes on how the RSAE reproduces this family's gate (``thresholds``: the
        :attr:`JumpRule.info` the upgrade used); default none."""
        return []

    # -- teacher training (rsae.teacher) -------------------------------------------------------------
    def new_teacher(self, d_in: int, d_sae: int, *, k: int, coefficient: float, metadata: dict[str, Any]) -> SAE:
        """A fresh, untrained teacher SAE of this family (weights uninitialised; see ``init_weights``)."""
        return self.sae_class(d_in, d_sae, metadata=metadata)

    def train_teacher_objective(self, sae: SAE, batch_size: int) -> LossFn | None:
        """The family's own training loss for ``sae`` (None: :func:`sae_loss`)."""
        return None

    def teacher_param_groups(self, sae: SAE, lr: float) -> list[dict[str, Any]] | None:
        """Adam parameter groups for training a teacher (None: one group at ``lr``)."""
        return None


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Register ``family`` under ``family.name`` and its SAE class under its ``cfg.json`` architecture
    (and :attr:`Family.aliases`). Re-registering a name replaces it. Returns ``family``."""
    _FAMILIES[family.name] = family
    register_architecture(family.sae_class.architecture, family.sae_class)
    for alias in family.aliases:
        register_architecture(alias, family.sae_class)
    return family


def get_family(name: str) -> Family:
    """The registered family ``name``.

    Raises:
        ValueError: no family of that name (the message lists the known ones).
    """
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown SAE family {name!r}; known: {sorted(_FAMILIES)}") from None


def family_names() -> tuple[str, ...]:
    """Names of the registered teacher families, in registration order."""
    return tuple(_FAMILIES)

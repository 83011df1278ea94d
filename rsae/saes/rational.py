"""The rational family: the rational gate and the Rational SAE (RSAE), the upgrade's output (never a teacher).

Source: N. Yin and Y. Yu, "Rational Sparse Autoencoder", arXiv 2606.14990 (2026), as read in
``docs/method.md``; safe denominator from Molina, Schramowski & Kersting 2020, "Padé Activation Units".

    phi_j(h) = C_out * s_j * r(h / (C_in * s_j)),   r(t) = P(t) / Q(t),
    P(t) = a_0 + a_1 t + ... + a_p t^p,   Q(t) = 1 + |b_1 t + ... + b_q t^q|   (Q >= 1: no poles)

``a`` [p + 1], ``b`` [q], ``log C_in`` and ``log C_out`` are shared by all latents (a handful of scalars),
the scales kept positive by their log parametrisation. ``s`` [d_sae] are per-latent scales that put each
latent's jump at the fitted jump position c: for a JumpReLU teacher s_j = theta_j / c, so that
s_j * g(h / s_j) = h * H(h - theta_j) exactly for the target g(t) = t * H(t - c); they replace the teacher's
per-latent thresholds (and are trained like them). For a ReLU teacher s = 1 and is not trained.

Exact sparsity. A rational is not exactly zero where the teacher's gate is; the encoder therefore outputs

    z_j = phi_j(h)  where r(t) > floor,  else exactly 0,

with ``floor`` a scalar in the units of r (the unit-interval gate), set at calibration so that the RSAE's
L0 on the calibration tokens equals the teacher's (see :func:`rsae.pipeline.calibrate.set_floor`); the report compares
it with the Remez fit's maximum error. L0 then counts real non-zeros. Gradients flow through active
entries only (like ReLU's).

TopK teachers (``rational.topk_k``): the jump sits at each token's separating threshold (per-token scale),
and with ``rational.topk_cap`` only the token's k largest pre-activations may be non-zero (L0 <= k), see
:meth:`RationalSAE.gate`.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import TeacherError
from ..kernels import rational_gate, rational_raw, rational_unit
from .base import SAE, register_architecture
from .topk import separating_threshold_from_top, top_values

TAILS = ("linear", "none")
"""Values of cfg ``rational.tail``: "linear" (r at t clamped to [-1, 1], slope 1 above it) or "none" (the
rational everywhere; what an upgrade without the key had)."""


def gate_tail(rational_cfg: dict[str, Any]) -> bool:
    """True when a ``rational`` cfg block asks for the linear tail.

    Raises:
        TeacherError: ``tail`` is neither "linear" nor "none".
    """
    tail = rational_cfg.get("tail", "none")
    if tail not in TAILS:
        raise TeacherError(f"cfg.json rational.tail must be one of {TAILS}", field="cfg.json.rational.tail")
    return tail == "linear"


class RationalGate(nn.Module):
    """Element-wise gate ``phi_j(h) = C_out s_j P(t) / (1 + |B(t)|)``, ``t = h / (C_in s_j)``, with exact zeros
    where ``r(t) <= floor``.

    Args:
        p, q: degrees of P and B (B has no constant term).
        a: initial numerator coefficients [p + 1] (ascending); default zeros.
        b: initial denominator coefficients [q] for t^1..t^q; default zeros.
        c_in, c_out: initial positive scales (units of h and of z).
        floor: exact-zero threshold in units of r (see module docstring).
        d_sae: number of latents, for the per-latent scales ``s`` (stored as ``log_scale``).
        scale: initial per-latent scales [d_sae] (> 0); default ones.
        train_scale: whether ``log_scale`` is trained (jump families) or a fixed buffer (ReLU).
        tail: the linear tail (:mod:`rsae.kernels`): r is evaluated at t clamped to [-1, 1] and continues with
            slope 1 above it (cfg ``rational.tail: "linear"``; upgrades made before it have no tail).

    Raises:
        ValueError: coefficient shapes do not match the degrees, or a scale is not positive.
    """

    def __init__(
        self,
        p: int,
        q: int,
        *,
        a=None,
        b=None,
        c_in: float = 1.0,
        c_out: float = 1.0,
        floor: float = 0.0,
        d_sae: int | None = None,
        scale=None,
        train_scale: bool = False,
        tail: bool = False,
    ) -> None:
        super().__init__()
        self.p, self.q, self.tail = int(p), int(q), bool(tail)
        self.a = nn.Parameter(torch.as_tensor(a if a is not None else [0.0] * (p + 1), dtype=torch.float32).clone())
        self.b = nn.Parameter(torch.as_tensor(b if b is not None else [0.0] * q, dtype=torch.float32).clone())
        if self.a.shape != (p + 1,) or self.b.shape != (q,):
            raise ValueError(
                f"coefficient shapes {tuple(self.a.shape)}, {tuple(self.b.shape)} do not match degrees ({p}, {q})"
            )
        if not (c_in > 0 and c_out > 0):
            raise ValueError("C_in and C_out must be positive")
        self.log_c_in = nn.Parameter(torch.tensor(math.log(c_in), dtype=torch.float32))
        self.log_c_out = nn.Parameter(torch.tensor(math.log(c_out), dtype=torch.float32))
        self.register_buffer("floor", torch.tensor(float(floor), dtype=torch.float32))
        s = torch.ones(d_sae or 1) if scale is None else torch.as_tensor(scale, dtype=torch.float32).clone()
        if (s <= 0).any() or not torch.isfinite(s).all():
            raise ValueError("per-latent scales must be finite and > 0")
        self.train_scale = bool(train_scale)
        if self.train_scale:
            self.log_scale = nn.Parameter(s.log())
        else:
            self.register_buffer("log_scale", s.log())

    @property
    def c_in(self) -> torch.Tensor:
        """C_in = exp(log_c_in) > 0 (units of h)."""
        return self.log_c_in.exp()

    @property
    def c_out(self) -> torch.Tensor:
        """C_out = exp(log_c_out) > 0 (units of z)."""
        return self.log_c_out.exp()

    @property
    def scale(self) -> torch.Tensor:
        """Per-latent scales s = exp(log_scale), [d_sae] (or [1] when shared)."""
        return self.log_scale.exp()

    def raw(self, h: torch.Tensor) -> torch.Tensor:
        """phi(h) without the floor, [..., d_sae] -> [..., d_sae]."""
        return rational_raw(h, self.a, self.b, self.c_in, self.c_out, self.scale, tail=self.tail)

    def unit(self, h: torch.Tensor) -> torch.Tensor:
        """r(t) at t = h / (C_in s), [..., d_sae] -> [..., d_sae] (the quantity the floor applies to)."""
        return rational_unit(self.a, self.b, h / (self.c_in * self.scale), self.tail)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """z = phi(h) where r(t) > floor else exactly 0; [..., d_sae] -> [..., d_sae]."""
        return rational_gate(h, self.a, self.b, self.c_in, self.c_out, self.scale, self.floor, tail=self.tail)

    def extra_repr(self) -> str:
        return f"p={self.p}, q={self.q}, train_scale={self.train_scale}, tail={self.tail}"


class RationalSAE(SAE):
    """SAE whose gate is a :class:`RationalGate`; cfg ``architecture: "rational"``.

    Weights file adds ``rational_a`` [p + 1], ``rational_b`` [q], ``log_c_in`` [], ``log_c_out`` [],
    ``gate_floor`` [] (r-units) and ``latent_scale`` [d_sae] to W_enc, b_enc, W_dec, b_dec. cfg adds
    ``rational: {p, q, train_scale, teacher_architecture, teacher_family, jump, ...}``.
    """

    architecture: ClassVar[str] = "rational"
    family: ClassVar[str] = "rational"

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        p: int = 3,
        q: int = 2,
        apply_b_dec_to_input: bool = True,
        metadata: dict[str, Any] | None = None,
        rational: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(d_in, d_sae, apply_b_dec_to_input=apply_b_dec_to_input, metadata=metadata)
        self.rational_cfg: dict[str, Any] = {"p": p, "q": q, "train_scale": False, **(rational or {})}
        self.gate_fn = RationalGate(
            p, q, d_sae=self.d_sae, train_scale=bool(self.rational_cfg["train_scale"]), tail=self.has_tail
        )

    @property
    def has_tail(self) -> bool:
        """Whether the gate has the linear tail (cfg ``rational.tail == "linear"``; absent in older upgrades)."""
        return gate_tail(self.rational_cfg)

    @property
    def topk_k(self) -> int | None:
        """k of a TopK teacher upgraded with the per-token separating threshold, else None."""
        k = self.rational_cfg.get("topk_k")
        return int(k) if k else None

    @property
    def jump_anchor(self) -> float:
        """Unit-interval position of the teacher's jump (``rational.anchor``; upgrades made before the
        'upper_edge' placement stored only ``rational.jump`` = c, which is then the anchor)."""
        return float(self.rational_cfg.get("anchor", self.rational_cfg["jump"]))

    def gate(self, h: torch.Tensor) -> torch.Tensor:
        """Rational gate with exact zeros, [..., d_sae] -> [..., d_sae].

        TopK upgrades (``rational.topk_k`` set): each token i gets the scale s_i = tau_i / a (a =
        :attr:`jump_anchor`, the unit-interval position of the jump) with tau_i its
        separating threshold (:func:`rsae.saes.topk.topk_separating_threshold`), i.e. z = s_i * G(h / s_i) with G
        the gate at unit
        scale, which equals C_out s_i r(h / (C_in s_i)) and puts the jump at tau_i for every token. With
        ``rational.topk_cap`` (the default for new TopK upgrades) only the token's k largest pre-activations
        can be non-zero (z = 0 where h < the token's k-th largest h), so L0 <= k exactly, as for the teacher:
        the rational shapes the values, the teacher's own top-k rule bounds the active set. Ties at the k-th
        value can let more than k through (measure zero for real activations).
        """
        if self.topk_k is None:
            return self.gate_fn(h)
        k = self.topk_k
        top = top_values(h, k)
        s = separating_threshold_from_top(top, k) / self.jump_anchor
        z = s * self.gate_fn(h / s)
        if self.rational_cfg.get("topk_cap", False):
            z = torch.where(h >= top[..., k - 1 : k], z, torch.zeros((), dtype=z.dtype, device=z.device))
        return z

    @classmethod
    def from_teacher(
        cls,
        teacher: SAE,
        *,
        a,
        b,
        c_in: float,
        c_out: float,
        floor: float = 0.0,
        scale: torch.Tensor | None = None,
        rational: dict[str, Any] | None = None,
    ) -> "RationalSAE":
        """Copy W_enc, b_enc, W_dec, b_dec (and conventions) from ``teacher`` exactly; set the gate.

        Args:
            a, b: rational coefficients (monomial, ascending; b without the constant term).
            c_in, c_out: initial global scales. floor: exact-zero floor in r-units.
            scale: per-latent scales s [d_sae] (jump families: theta / c); None keeps ones, not trained.
        """
        p, q = len(a) - 1, len(b)
        train_scale = scale is not None
        sae = cls(
            teacher.d_in,
            teacher.d_sae,
            p=p,
            q=q,
            apply_b_dec_to_input=teacher.apply_b_dec_to_input,
            metadata=dict(teacher.metadata),
            rational={
                "teacher_architecture": teacher.architecture,
                "teacher_family": teacher.family,
                "train_scale": train_scale,
                **(rational or {}),
            },
        )
        sae.copy_weights(teacher)
        sae.gate_fn = RationalGate(
            p,
            q,
            a=a,
            b=b,
            c_in=c_in,
            c_out=c_out,
            floor=floor,
            d_sae=teacher.d_sae,
            scale=None if scale is None else scale.detach().cpu(),
            train_scale=train_scale,
            tail=sae.has_tail,
        )
        return sae

    def gate_scalars(self) -> list[nn.Parameter]:
        """The gate's shared scalars: a [p + 1], b [q], log C_in [], log C_out [] (what calibration fits)."""
        g = self.gate_fn
        return [g.a, g.b, g.log_c_in, g.log_c_out]

    def scale_parameters(self) -> list[nn.Parameter]:
        """The per-latent scales ``log_scale`` [d_sae] when they are trained (jump families), else []."""
        return [self.gate_fn.log_scale] if self.gate_fn.train_scale else []

    def param_groups(self, lr: float, gate_lr: float, threshold_lr: float) -> list[dict[str, Any]]:
        """Adam groups for fine-tuning: SAE weights at ``lr``, gate scalars at ``gate_lr``, per-latent scales
        (when trained) at ``threshold_lr``, the rate of the teacher's thresholds in the control."""
        return self.param_groups_with(lr, (self.gate_scalars(), gate_lr), (self.scale_parameters(), threshold_lr))

    def gate_raw(self, h: torch.Tensor) -> torch.Tensor:
        """The gate without its floor, phi(h), [..., d_sae] -> [..., d_sae] (what calibration compares)."""
        return self.gate_fn.raw(h)

    def elementwise_gate(self, h: torch.Tensor) -> torch.Tensor:
        """The rational gate with its floor at the stored scales, without the per-token TopK rule of
        :meth:`gate`, [..., d_sae] -> [..., d_sae] (for plots of the gate's shape)."""
        return self.gate_fn(h)

    def gate_unit(self, h: torch.Tensor) -> torch.Tensor:
        """r(t) at t = h / (C_in s), [..., d_sae] -> [..., d_sae] (the quantity the floor applies to)."""
        return self.gate_fn.unit(h)

    @property
    def floor(self) -> float:
        """The exact-zero floor, in units of r."""
        return float(self.gate_fn.floor)

    @torch.no_grad()
    def set_floor(self, value: float) -> None:
        """Set the exact-zero floor (units of r): z = 0 where r(t) <= ``value``."""
        self.gate_fn.floor.fill_(float(value))

    @torch.no_grad()
    def support_edge(self, grid_points: int = 4001) -> float:
        """t* (unit-interval units): the lower edge of the gate's positive support, the smallest grid point t of
        [-1, 1] above which r(t) > floor holds up to t = 1 (linearly interpolated between the last grid point
        at or below the floor and the next one). Latent j's effective threshold is then C_in s_j t* (units of
        h). Returns 1.0 when r(1) <= floor (no support on the interval)."""
        g = self.gate_fn
        t = torch.linspace(-1.0, 1.0, grid_points, dtype=torch.float64)
        r = rational_unit(g.a.detach().double(), g.b.detach().double(), t) - float(g.floor)
        below = torch.nonzero(r <= 0).flatten()
        if below.numel() == 0:
            return -1.0
        i = int(below[-1])
        if i == grid_points - 1:
            return 1.0
        r0, r1 = float(r[i]), float(r[i + 1])  # r0 <= 0 < r1
        return float(t[i] + (t[i + 1] - t[i]) * (-r0) / (r1 - r0))

    def effective_threshold(self) -> torch.Tensor:
        """Per-latent thresholds of the gate's support, theta_j = C_in s_j t* [d_sae] (units of h; see
        :meth:`support_edge`). Differentiable w.r.t. the per-latent scales s only (C_in and t* are held), so
        an L0 penalty through it moves the latents' thresholds as a JumpReLU's L0 penalty moves its theta."""
        return self.gate_fn.c_in.detach() * self.support_edge() * self.gate_fn.scale

    def gate_summary(self) -> dict[str, Any]:
        """The fitted gate for the report: coefficients a, b, C_in, C_out, floor, whether scales train and
        their median."""
        g = self.gate_fn
        return {
            "a": g.a.tolist(),
            "b": g.b.tolist(),
            "c_in": g.c_in.item(),
            "c_out": g.c_out.item(),
            "floor": g.floor.item(),
            "train_scale": g.train_scale,
            "scale_median": g.scale.median().item(),
        }

    def cfg_dict(self) -> dict[str, Any]:
        """SAELens cfg plus the ``rational`` block."""
        d = super().cfg_dict()
        d["rational"] = dict(self.rational_cfg)
        return d

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """Gate scalars saved beside the SAE weights."""
        g = self.gate_fn
        return {
            "rational_a": g.a,
            "rational_b": g.b,
            "log_c_in": g.log_c_in,
            "log_c_out": g.log_c_out,
            "gate_floor": g.floor,
            "latent_scale": g.scale,
        }

    @classmethod
    def from_parts(cls, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "RationalSAE":
        """Build from cfg + tensors; validates the rational block and gate tensors.

        Raises:
            TeacherError: missing or inconsistent ``rational`` cfg / tensors.
        """
        rc = cfg.get("rational")
        if not isinstance(rc, dict):
            raise TeacherError("cfg.json of a rational SAE needs a 'rational' object", field="cfg.json.rational")
        p, q = rc.get("p"), rc.get("q")
        for k, v in (("p", p), ("q", q)):
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 32:
                raise TeacherError(
                    f"cfg.json rational.{k} must be an integer in [0, 32]", field=f"cfg.json.rational.{k}"
                )
        shapes = {
            "rational_a": (p + 1,),
            "rational_b": (q,),
            "log_c_in": (),
            "log_c_out": (),
            "gate_floor": (),
            "latent_scale": (cfg["d_sae"],),
        }
        for n, s in shapes.items():
            if n not in tensors or tuple(tensors[n].shape) != s or not torch.isfinite(tensors[n]).all():
                raise TeacherError(
                    f"tensor '{n}' missing, non-finite or not of shape {list(s)}", field=f"sae_weights.safetensors.{n}"
                )
        sae = super().from_parts(cfg, tensors, p=p, q=q, rational=rc)
        with torch.no_grad():
            sae.gate_fn.a.copy_(tensors["rational_a"])
            sae.gate_fn.b.copy_(tensors["rational_b"])
            sae.gate_fn.log_c_in.copy_(tensors["log_c_in"])
            sae.gate_fn.log_c_out.copy_(tensors["log_c_out"])
            sae.gate_fn.floor.copy_(tensors["gate_floor"])
            if (tensors["latent_scale"] <= 0).any():
                raise TeacherError("tensor 'latent_scale' must be > 0", field="sae_weights.safetensors.latent_scale")
            sae.gate_fn.log_scale.copy_(tensors["latent_scale"].log())
        return sae


class _SupportStepFn(torch.autograd.Function):
    """H(u) with the straight-through rectangle-kernel estimator d/du = (1 / eps) K(u / eps), K(v) = 1[|v| < 1/2]
    (Rajamanoharan et al. 2024, eq. 12, applied to u = r(t) - floor, the gate's own support test)."""

    @staticmethod
    def forward(ctx, u, eps: float):  # noqa: D102
        ctx.save_for_backward(u)
        ctx.eps = eps
        return (u > 0).to(u.dtype)

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        (u,) = ctx.saved_tensors
        return g * (u.abs() < ctx.eps / 2).to(g.dtype) / ctx.eps, None


def rational_l0_loss(linear_input_grad: bool = False, scales_only: bool = False, scales_as_thresholds: bool = False):
    """The objective MSE + lam * L0 for a :class:`RationalSAE` (a JumpReLU upgrade), the JumpReLU family's own
    kind of penalty (Rajamanoharan et al. 2024, eq. 9-12) put on the rational gate's own support:
    L0 = sum_j H(r(t_j) - floor), t_j = h_j / (C_in s_j), with the straight-through rectangle kernel of width
    eps = floor (units of r) for its gradient. The pre-activations are detached in this term, so its gradient
    reaches the gate's parameters that decide the support (a, b, C_in and the per-latent scales s), not W_enc,
    b_enc, W_dec, b_dec or C_out. A penalty on one threshold per latent (C_in s_j t*) was tried first and let the
    rational open its support elsewhere (docs/method.md). The MSE term trains every parameter through the gate as
    :func:`rsae.saes.family.sae_loss` does.

    ``linear_input_grad``: the MSE term's gradient with respect to the pre-activations h is taken as C_out / C_in
    on the support (the slope of the teacher's gate t H(t - a) above its jump, exact on the linear tail) instead
    of the rational's own slope, which is steep in the band where r rises to its jump; the values, and the
    gradients to a, b, C_in, C_out and s, are unchanged. The JumpReLU analogue: its output passes gradient 1 to
    h and the jump's only to the threshold (Rajamanoharan et al. 2024).

    ``scales_only``: the L0 term's gradient reaches the per-latent scales s only (a, b and C_in detached in it),
    as a JumpReLU's reaches only its per-latent thresholds; the shared scalars then learn from the MSE alone.

    ``scales_as_thresholds`` (implies ``scales_only``): z = v * H(r(t) - floor) with v the gate's value at the
    scales held fixed and H the straight-through step, so the scales get gradient only through the support's
    estimator, from the MSE and the L0 term alike, as a JumpReLU's thresholds do (Rajamanoharan et al. 2024); a
    small error of r in its linear part then no longer drives every scale at the full Adam rate.

    Returns ``loss_fn(sae, x [n, d_in], lam) -> (loss, parts)`` with parts mse, l0 (exact non-zeros of z), l1
    (decoder-norm weighted, reported only) as floats.
    """
    from .base import mse_l0_objective

    def loss_fn(sae: SAE, x: torch.Tensor, lam: float) -> tuple[torch.Tensor, dict[str, float]]:
        g = sae.gate_fn
        h = sae.pre_acts(x)
        hv = h.detach() if linear_input_grad else h  # the pre-activations the values see
        floor = max(sae.floor, 1e-6)
        if scales_only or scales_as_thresholds:
            u = rational_unit(g.a.detach(), g.b.detach(), h.detach() / (g.c_in.detach() * g.scale), g.tail)
        else:
            u = sae.gate_unit(h.detach())
        on = _SupportStepFn.apply(u - floor, floor)
        if scales_as_thresholds:
            z = rational_raw(hv, g.a, g.b, g.c_in, g.c_out, g.scale.detach(), tail=g.tail) * on
        else:
            z = sae.gate(hv)
        if linear_input_grad:  # value unchanged; dz/dh = C_out / C_in on the support
            z = z + (z != 0).to(h.dtype) * (g.c_out / g.c_in).detach() * (h - hv)
        return mse_l0_objective(sae, x, z, on.sum(-1).mean(), lam)

    return loss_fn


register_architecture(RationalSAE.architecture, RationalSAE)

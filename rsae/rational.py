"""The rational gate and the Rational SAE (RSAE).

Source: N. Yin and Y. Yu, "Rational Sparse Autoencoder", arXiv 2606.14990 (2026), as read in
``docs/method.md``; safe denominator from Molina, Schramowski & Kersting 2020, "Padé Activation Units".

    phi(h) = C_out * r(h / C_in),   r(t) = P(t) / Q(t),
    P(t) = a_0 + a_1 t + ... + a_p t^p,   Q(t) = 1 + |b_1 t + ... + b_q t^q|   (Q >= 1: no poles)

``a`` [p + 1], ``b`` [q], ``log C_in`` and ``log C_out`` are shared by all latents (a handful of scalars),
the scales kept positive by their log parametrisation.

Exact sparsity. A rational is not exactly zero where the teacher's gate is; the encoder therefore outputs

    z = phi(h)  where phi(h) > floor,  else exactly 0,

with ``floor`` >= 0 a buffer set at calibration to the 99.99th percentile of phi(h) over the real
(token, latent) pairs the teacher leaves inactive (so at most 0.01% of them leak through), i.e. the
fit's residual error on the off side of the gate measured on real data. L0 then counts real non-zeros.
Gradients flow through active entries only (like ReLU's).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from .errors import TeacherError
from .sae import SAE, register_architecture


def horner(coeffs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """sum_k coeffs[k] t^k by Horner's rule. coeffs: [K] ascending; t: any shape -> same shape."""
    out = torch.zeros_like(t) + coeffs[-1]
    for k in range(coeffs.shape[0] - 2, -1, -1):
        out = out * t + coeffs[k]
    return out


class RationalGate(nn.Module):
    """Element-wise gate ``phi(h) = C_out * P(h / C_in) / (1 + |B(h / C_in)|)`` with exact-zero floor.

    Args:
        p, q: degrees of P and B (B has no constant term).
        a: initial numerator coefficients [p + 1] (ascending); default zeros.
        b: initial denominator coefficients [q] for t^1..t^q; default zeros.
        c_in, c_out: initial positive scales.
        floor: exact-zero threshold on phi (see module docstring).
    """

    def __init__(self, p: int, q: int, *, a=None, b=None, c_in: float = 1.0, c_out: float = 1.0,
                 floor: float = 0.0) -> None:
        super().__init__()
        self.p, self.q = int(p), int(q)
        self.a = nn.Parameter(torch.as_tensor(a if a is not None else [0.0] * (p + 1), dtype=torch.float32).clone())
        self.b = nn.Parameter(torch.as_tensor(b if b is not None else [0.0] * q, dtype=torch.float32).clone())
        if self.a.shape != (p + 1,) or self.b.shape != (q,):
            raise ValueError(f"coefficient shapes {tuple(self.a.shape)}, {tuple(self.b.shape)} do not match "
                             f"degrees ({p}, {q})")
        if not (c_in > 0 and c_out > 0):
            raise ValueError("C_in and C_out must be positive")
        self.log_c_in = nn.Parameter(torch.tensor(math.log(c_in), dtype=torch.float32))
        self.log_c_out = nn.Parameter(torch.tensor(math.log(c_out), dtype=torch.float32))
        self.register_buffer("floor", torch.tensor(float(floor), dtype=torch.float32))

    @property
    def c_in(self) -> torch.Tensor:
        """C_in = exp(log_c_in) > 0 (units of h)."""
        return self.log_c_in.exp()

    @property
    def c_out(self) -> torch.Tensor:
        """C_out = exp(log_c_out) > 0 (units of z)."""
        return self.log_c_out.exp()

    def raw(self, h: torch.Tensor) -> torch.Tensor:
        """phi(h) without the floor, any shape -> same shape."""
        t = h / self.c_in
        P = horner(self.a, t)
        if self.q > 0:
            B = horner(torch.cat([self.b.new_zeros(1), self.b]), t)
            return self.c_out * P / (1.0 + B.abs())
        return self.c_out * P

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """z = phi(h) where phi(h) > floor else 0; any shape -> same shape."""
        y = self.raw(h)
        return torch.where(y > self.floor, y, torch.zeros((), dtype=y.dtype, device=y.device))

    def extra_repr(self) -> str:
        return f"p={self.p}, q={self.q}"


class RationalSAE(SAE):
    """SAE whose gate is a :class:`RationalGate`; cfg ``architecture: "rational"``.

    Weights file adds ``rational_a`` [p + 1], ``rational_b`` [q], ``log_c_in`` [], ``log_c_out`` [],
    ``gate_floor`` [] to W_enc, b_enc, W_dec, b_dec. cfg adds ``rational: {p, q, teacher_architecture,
    teacher_family, jump}``.
    """

    architecture: ClassVar[str] = "rational"
    family: ClassVar[str] = "rational"

    def __init__(self, d_in: int, d_sae: int, *, p: int = 3, q: int = 2, apply_b_dec_to_input: bool = True,
                 metadata: dict[str, Any] | None = None, rational: dict[str, Any] | None = None) -> None:
        super().__init__(d_in, d_sae, apply_b_dec_to_input=apply_b_dec_to_input, metadata=metadata)
        self.rational_cfg: dict[str, Any] = {"p": p, "q": q, **(rational or {})}
        self.gate_fn = RationalGate(p, q)

    def gate(self, h: torch.Tensor) -> torch.Tensor:
        """Rational gate with exact zeros, [..., d_sae] -> [..., d_sae]."""
        return self.gate_fn(h)

    @classmethod
    def from_teacher(cls, teacher: SAE, *, a, b, c_in: float, c_out: float, floor: float = 0.0,
                     rational: dict[str, Any] | None = None) -> "RationalSAE":
        """Copy W_enc, b_enc, W_dec, b_dec (and conventions) from ``teacher`` exactly; set the gate."""
        p, q = len(a) - 1, len(b)
        sae = cls(teacher.d_in, teacher.d_sae, p=p, q=q, apply_b_dec_to_input=teacher.apply_b_dec_to_input,
                  metadata=dict(teacher.metadata),
                  rational={"teacher_architecture": teacher.architecture, "teacher_family": teacher.family,
                            **(rational or {})})
        with torch.no_grad():
            for n in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(sae, n).copy_(getattr(teacher, n))
        sae.gate_fn = RationalGate(p, q, a=a, b=b, c_in=c_in, c_out=c_out, floor=floor)
        return sae

    def cfg_dict(self) -> dict[str, Any]:
        """SAELens cfg plus the ``rational`` block."""
        d = super().cfg_dict()
        d["rational"] = dict(self.rational_cfg)
        return d

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """Gate scalars saved beside the SAE weights."""
        g = self.gate_fn
        return {"rational_a": g.a, "rational_b": g.b, "log_c_in": g.log_c_in, "log_c_out": g.log_c_out,
                "gate_floor": g.floor}

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
                raise TeacherError(f"cfg.json rational.{k} must be an integer in [0, 32]",
                                   field=f"cfg.json.rational.{k}")
        shapes = {"rational_a": (p + 1,), "rational_b": (q,), "log_c_in": (), "log_c_out": (), "gate_floor": ()}
        for n, s in shapes.items():
            if n not in tensors or tuple(tensors[n].shape) != s or not torch.isfinite(tensors[n]).all():
                raise TeacherError(f"tensor '{n}' missing, non-finite or not of shape {list(s)}",
                                   field=f"sae_weights.safetensors.{n}")
        sae = cls(cfg["d_in"], cfg["d_sae"], p=p, q=q,
                  apply_b_dec_to_input=cfg.get("apply_b_dec_to_input", True),
                  metadata=cfg.get("metadata") or {}, rational=rc)
        with torch.no_grad():
            for n in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(sae, n).copy_(tensors[n])
            sae.gate_fn.a.copy_(tensors["rational_a"])
            sae.gate_fn.b.copy_(tensors["rational_b"])
            sae.gate_fn.log_c_in.copy_(tensors["log_c_in"])
            sae.gate_fn.log_c_out.copy_(tensors["log_c_out"])
            sae.gate_fn.floor.copy_(tensors["gate_floor"])
        return sae


register_architecture("rational", RationalSAE)

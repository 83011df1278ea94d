"""Fast rational gate: one autograd node that saves only ``h`` and recomputes in backward.

Sources: the safe rational ``P / (1 + |B|)`` of Padé Activation Units (A. Molina, P. Schramowski and
K. Kersting, "Padé Activation Units: End-to-end Learning of Flexible Activation Functions in Deep
Networks", ICLR 2020, "safe PAU"); rational activations with trainable coefficients (N. Boullé,
Y. Nakatsukasa and A. Townsend, "Rational neural networks", NeurIPS 2020).

Element-wise, for pre-activations ``h`` [..., d_sae] and per-latent scales ``s`` [d_sae]:

    t = h / (C_in * s),   r(t) = P(t) / (1 + |B(t)|),
    P(t) = a_0 + a_1 t + ... + a_p t^p,   B(t) = b_1 t + ... + b_q t^q,
    raw = C_out * s * r(t),   z = raw where r(t) > floor else exactly 0.

With ``tail=True`` (the "linear tail", new upgrades' default; ``docs/method.md``, "Outside the fitted
interval") r is evaluated at t clamped to [-1, 1], the interval the Remez fit controls, and continues
linearly with slope 1 above it: ``r_tail(t) = r(clamp(t, -1, 1)) + max(t - 1, 0)``; the teacher's gate is
exactly linear above its jump, so the continuation is exact for the target, and below -1 the gate stays at
r(-1) ~ 0 instead of extrapolating the rational.

``floor`` is in units of r (not of z) and carries no gradient; d|B|/dB = sign(B) (0 at B = 0), as
``torch.abs``. Implementations (``impl`` argument, else ``$RSAE_GATE_IMPL``, else ``"auto"``):

- ``"eager"``: the formula in eager torch ops (the reference; autograd keeps ~p + q + 6 tensors of h's size).
- ``"fused"``: :class:`RationalGateFunction` with eager math run in row chunks; saves only ``h`` for
  backward and recomputes P, P', B, B' there; coefficient gradients are accumulated chunk by chunk.
- ``"compiled"``: the same autograd node with its forward / backward math compiled by ``torch.compile``
  (inductor) on first use, the batch dimension marked dynamic. Any failure while compiling is logged once
  and the process falls back to ``"fused"`` for good.
- ``"auto"``: ``"compiled"`` (measured fastest, ``docs/performance.md``) for inputs of at least
  :data:`AUTO_COMPILE_MIN_ELEMS` elements, ``"fused"`` for smaller ones (no compile for tests and tiny calls).

Nothing is compiled at import time. The first compiled call per (p, q, variant) pays inductor's compile of
the forward and of the backward kernel: at (9, 8) about 26 s together on a cold cache and 3-6 s with
inductor's on-disk cache warm (2-core CPU, ``bench/gate_step.py``); logged at INFO.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import types
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.function import once_differentiable

log = logging.getLogger(__name__)

IMPLS = ("auto", "compiled", "fused", "eager")
"""Accepted values of ``impl`` / ``$RSAE_GATE_IMPL``."""
ENV_VAR = "RSAE_GATE_IMPL"
CHUNK_ELEMS = 1 << 20
"""Elements per row chunk of the fused eager path (4 MiB of float32; its ~7 temporaries stay in L3). Each
chunk runs ~2 (p + q) torch ops forward and ~7 (p + q) backward, each an OpenMP parallel region. 2^18 and
2^20 cost the same on one thread; fewer regions suffer less from OpenMP spin-waiting on a loaded machine
(``docs/performance.md``)."""
AUTO_COMPILE_MIN_ELEMS = 1 << 20
""""auto" compiles only for inputs of at least this many elements (a training batch is 4096 x 4608 = 18.9M);
smaller calls (tests, tiny evaluations) run the fused path and never trigger a compile."""

_INDUCTOR_OPTIONS = {
    "realize_reads_threshold": 1000,
    "realize_opcount_threshold": 10000,
    "realize_acc_reads_threshold": 1000,
}
"""Inductor options for the gate kernels: never materialise an intermediate [m, d] buffer. With the defaults
inductor stores G / Q and G r sign(B) / Q (read by the p + q + 1 coefficient sums) as two extra h-sized
buffers; inlining them keeps backward's memory at dL/dh alone and was 30% faster (275 -> 190 ms, (9, 8),
4096 x 4608, 1 thread)."""

_lock = threading.Lock()
_compiled: dict[tuple, Callable] = {}
_compile_failed: str | None = None  # reason, once compilation failed; then "compiled" means "fused"


# -- reference -----------------------------------------------------------------------------------------
def horner(coeffs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """sum_k coeffs[k] t^k by Horner's rule. coeffs: [K] ascending; t: any shape -> same shape."""
    out = torch.zeros_like(t) + coeffs[-1]
    for k in range(coeffs.shape[0] - 2, -1, -1):
        out = out * t + coeffs[k]
    return out


def rational_unit(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor, tail: bool = False) -> torch.Tensor:
    """r(t) = P(t) / (1 + |B(t)|) element-wise in eager torch ops. a: [p + 1], b: [q], t: any shape.
    ``tail``: r(clamp(t, -1, 1)) + max(t - 1, 0) (the linear tail, module docstring)."""
    tc = t.clamp(-1.0, 1.0) if tail else t
    P = horner(a, tc)
    r = P / (1.0 + horner(torch.cat([b.new_zeros(1), b]), tc).abs()) if b.numel() else P
    return r + (t - 1.0).clamp(min=0.0) if tail else r


def _eager_r(h, a, b, c_in, s, tail=False):
    return rational_unit(a, b, h / (c_in if s is None else c_in * s), tail)


def rational_raw_eager(
    h: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    c_in: torch.Tensor,
    c_out: torch.Tensor,
    s: torch.Tensor | None = None,
    tail: bool = False,
) -> torch.Tensor:
    """Reference ``raw = C_out * s * P(t) / (1 + |B(t)|)``, ``t = h / (C_in * s)``, in eager torch ops.

    Shapes as :func:`rational_raw`. Plain autograd: saves O(p + q) tensors of h's size for backward.
    """
    return (c_out if s is None else c_out * s) * _eager_r(h, a, b, c_in, s, tail)


def rational_gate_eager(
    h: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    c_in: torch.Tensor,
    c_out: torch.Tensor,
    s: torch.Tensor | None = None,
    floor: float | torch.Tensor = 0.0,
    tail: bool = False,
) -> torch.Tensor:
    """Reference gate: :func:`rational_raw_eager` where r > floor, else exactly 0 (``torch.where``).

    Shapes as :func:`rational_gate`.
    """
    r = _eager_r(h, a, b, c_in, s, tail)
    raw = (c_out if s is None else c_out * s) * r
    return torch.where(r > floor, raw, torch.zeros((), dtype=raw.dtype, device=raw.device))


# -- functional math, traced by torch.compile -------------------------------------------------------------
def _poly(c: torch.Tensor, t: torch.Tensor, deg: int) -> torch.Tensor:
    """sum_{k<=deg} c[k] t^k by Horner; c: 1-D tensor."""
    if deg <= 0:
        return torch.zeros_like(t) + c[0]
    out = t * c[deg] + c[deg - 1]
    for k in range(deg - 2, -1, -1):
        out = out * t + c[k]
    return out


def _ks(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.arange(1, n + 1, dtype=like.dtype, device=like.device)


def _r_math(t, a, b, p: int, q: int, tail: bool):
    """r(t) (with the linear tail when ``tail``) by the ops the compiled kernels trace."""
    tc = t.clamp(-1.0, 1.0) if tail else t
    P = _poly(a, tc, p)
    r = P / (1.0 + (_poly(b, tc, q - 1) * tc).abs()) if q else P
    return r + (t - 1.0).clamp(min=0.0) if tail else r


def _fwd_math(h, a, b, u, v, floor, p: int, q: int, use_floor: bool, tail: bool = False):
    """z (or raw) for h [m, d]; u = C_in * s and v = C_out * s broadcast against h."""
    r = _r_math(h / u, a, b, p, q, tail)
    raw = r * v
    return torch.where(r > floor, raw, 0.0) if use_floor else raw


def _unit_math(h, a, b, u, p: int, q: int, tail: bool = False):
    """r(t) for h [m, d], u = C_in * s broadcast against h; by the ops of :func:`_fwd_math`. (Compiled, a float
    output and an eager ``r > floor`` after it cost 64 ms at 4096 x 4608 where a fused bool output, which inductor
    does not vectorise here, cost 208 ms.)"""
    return _r_math(h / u, a, b, p, q, tail)


def _bwd_math(
    h, gz, a, b, c_in, c_out, s, floor, p: int, q: int, use_floor: bool, need_param: bool, need_s: bool,
    tail: bool = False,
):  # fmt: skip
    """(dL/dh [m, d], [dL/da [p+1], dL/db [q], dL/dC_in, dL/dC_out] or None, dL/ds [d] or None), given
    gz = dL/dz [m, d]. dr/dt = (P' - r sign(B) B') / Q; dr/da_k = t^k / Q; dr/db_k = -r sign(B) t^k / Q.
    With ``tail`` these are taken at t clamped to [-1, 1], and dr/dt is 1 above 1 and 0 below -1."""
    u = c_in if s is None else c_in * s
    v = c_out if s is None else c_out * s
    t0 = h / u
    t = t0.clamp(-1.0, 1.0) if tail else t0
    P = _poly(a, t, p)
    dP = _poly(a[1:] * _ks(p, a), t, p - 1) if p else torch.zeros_like(t)
    if q:
        B = _poly(b, t, q - 1) * t
        dB = _poly(b * _ks(q, b), t, q - 1)
        sgn = torch.sign(B)
        Q = 1.0 + B.abs()
        r = P / Q
        rs = r * sgn
        dr = (dP - rs * dB) / Q
    else:
        r, dr = P, dP
    if tail:
        r = r + (t0 - 1.0).clamp(min=0.0)
        dr = torch.where(t0 > 1.0, 1.0, torch.where(t0 < -1.0, 0.0, dr))
    g = torch.where(r > floor, gz, 0.0) if use_floor else gz
    G = g * v  # dL/dr
    gh = G * dr / u
    params = gs = None
    if need_param:
        w = G / Q if q else G  # dL/da_k = sum w t^k
        ga = [w.sum()]
        wk = w
        for _ in range(p):
            wk = wk * t
            ga.append(wk.sum())
        gb = []
        if q:
            wk = -(w * rs)  # dL/db_k = -sum G r sign(B) t^k / Q
            for _ in range(q):
                wk = wk * t
                gb.append(wk.sum())
        g_cin = -(gh * h).sum() / c_in
        g_cout = (G * r).sum() / c_out
        params = [torch.stack(ga), torch.stack(gb) if gb else h.new_zeros(0), g_cin, g_cout]
    if need_s:
        gs = (g * (r - t0 * dr)).sum(0) * c_out
    return gh, params, gs


# -- fused eager (row chunks, in-place ops) ----------------------------------------------------------------
def _horner_(c: list[float], t: torch.Tensor, deg: int) -> torch.Tensor:
    """New tensor sum_{k<=deg} c[k] t^k by in-place Horner (same rounding as :func:`_poly`)."""
    if deg <= 0:
        return torch.full_like(t, c[0])
    out = torch.mul(t, c[deg]).add_(c[deg - 1])
    for k in range(deg - 2, -1, -1):
        out.mul_(t).add_(c[k])
    return out


def _b_poly_(bl: list[float], t: torch.Tensor) -> torch.Tensor:
    """New tensor B(t) = b_1 t + ... + b_q t^q (bl = [b_1 .. b_q], q >= 1)."""
    out = torch.mul(t, bl[-1])
    for k in range(len(bl) - 2, -1, -1):
        out.add_(bl[k]).mul_(t)
    return out


def _chunks(h: torch.Tensor):
    step = max(1, CHUNK_ELEMS // max(1, h.shape[1]))
    return (slice(i, i + step) for i in range(0, h.shape[0], step))


def _r_fused(al: list[float], bl: list[float], t: torch.Tensor, tail: bool) -> torch.Tensor:
    """New tensor r(t) (with the linear tail when ``tail``) for one chunk ``t`` (not modified)."""
    p, q = len(al) - 1, len(bl)
    tc = t.clamp(-1.0, 1.0) if tail else t
    r = _horner_(al, tc, p)
    if q:
        r.div_(_b_poly_(bl, tc).abs_().add_(1.0))
    if tail:
        r.add_((t - 1.0).clamp_(min=0.0))
    return r


def _fwd_fused(h, a, b, c_in, c_out, s, floor: float, use_floor: bool, tail: bool = False):
    """z (or raw) [m, d] by row chunks; temporaries: ~3 chunk-sized tensors."""
    al, bl = a.tolist(), b.tolist()
    u = c_in if s is None else c_in * s
    v = c_out if s is None else c_out * s
    out = torch.empty_like(h)
    for sl in _chunks(h):
        oc = out[sl]
        r = _r_fused(al, bl, h[sl] / u, tail)
        torch.mul(r, v, out=oc)
        if use_floor:  # NaN r -> 0, as torch.where(r > floor, ...)
            oc.masked_fill_(r.gt(floor).logical_not_(), 0.0)
    return out


def _bwd_fused(
    h, gz, a, b, c_in, c_out, s, floor: float, use_floor: bool, need_param: bool, need_s: bool, tail: bool = False
):
    """Same contract as :func:`_bwd_math` by row chunks; parameter gradients summed over chunks."""
    p, q = a.shape[0] - 1, b.shape[0]
    al, bl = a.tolist(), b.tolist()
    dal = [k * al[k] for k in range(1, p + 1)]
    dbl = [k * bl[k - 1] for k in range(1, q + 1)]
    u = c_in if s is None else c_in * s
    v = c_out if s is None else c_out * s
    gh = torch.empty_like(h)
    sums, gs = [], None
    for sl in _chunks(h):
        hc, ghc = h[sl], gh[sl]
        t0 = hc / u
        t = t0.clamp(-1.0, 1.0) if tail else t0
        r = _horner_(al, t, p)  # P, then r
        dr = _horner_(dal, t, p - 1) if p else torch.zeros_like(t)  # P', then dr/dt
        if q:
            B = _b_poly_(bl, t)
            dB = _horner_(dbl, t, q - 1)
            rs = torch.sign(B)
            Q = B.abs_().add_(1.0)
            r.div_(Q)
            rs.mul_(r)  # r sign(B)
            dr.sub_(dB.mul_(rs)).div_(Q)  # (P' - r sign(B) B') / Q
        if tail:  # r and dr/dt of the linear tail; the coefficient terms below stay at the clamped t
            r = r.add((t0 - 1.0).clamp_(min=0.0))
            dr.masked_fill_(t0 > 1.0, 1.0).masked_fill_(t0 < -1.0, 0.0)
        G = gz[sl] * v  # dL/dr
        if use_floor:
            G.masked_fill_(r.gt(floor).logical_not_(), 0.0)
        torch.mul(G, dr, out=ghc).div_(u)
        if need_s:  # sum_rows G (r - t dr), / s at the end
            x = torch.mul(t0, dr)
            torch.sub(r, x, out=x).mul_(G)
            gs = x.sum(0) if gs is None else gs.add_(x.sum(0))
        if need_param:
            cs = [torch.dot(G.view(-1), r.view(-1)), torch.dot(ghc.view(-1), hc.reshape(-1))]
            w = G.div_(Q) if q else G  # dL/da_k = sum w t^k
            w2 = torch.mul(w, rs) if q else None  # dL/db_k = -sum w r sign(B) t^k
            cs.append(w.sum())
            for _ in range(p):
                cs.append(w.mul_(t).sum())
            for _ in range(q):
                cs.append(w2.mul_(t).sum())
            sums.append(torch.stack(cs))
    params = None
    if need_param:
        tot = torch.stack(sums).sum(0)
        params = [tot[2 : 3 + p], -tot[3 + p :], -tot[1] / c_in, tot[0] / c_out]
    if need_s:
        gs = gs / s
    return gh, params, gs


# -- compiled ---------------------------------------------------------------------------------------------
def _own_code(fn: Callable) -> Callable:
    """A copy of closure ``fn`` with its own code object: dynamo keys its cache (and its recompile limit) on
    the code object, so each (p, q, flags) variant gets its own instead of sharing one."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _options() -> dict[str, Any]:
    """The :data:`_INDUCTOR_OPTIONS` this torch knows (unknown keys would fail the compile)."""
    import torch._inductor.config as cfg

    return {k: v for k, v in _INDUCTOR_OPTIONS.items() if hasattr(cfg, k)}


def _get_compiled(kind: str, p: int, q: int, *flags: bool) -> Callable:
    """The torch.compile'd forward or backward for one (p, q, flags) variant, built lazily."""
    key = (kind, p, q, *flags)
    fn = _compiled.get(key)
    if fn is None:
        with _lock:
            fn = _compiled.get(key)
            if fn is None:
                if kind == "fwd":
                    use_floor, tail = flags

                    def fwd(h, a, b, u, v, floor):
                        return _fwd_math(h, a, b, u, v, floor, p, q, use_floor, tail)

                    fn = torch.compile(_own_code(fwd), dynamic=False, fullgraph=True, options=_options())
                elif kind == "support":
                    (tail,) = flags

                    def support(h, a, b, u):
                        return _unit_math(h, a, b, u, p, q, tail)

                    fn = torch.compile(_own_code(support), dynamic=False, fullgraph=True, options=_options())
                else:
                    use_floor, need_param, need_s, tail = flags

                    def bwd(h, gz, a, b, c_in, c_out, s, floor):
                        return _bwd_math(h, gz, a, b, c_in, c_out, s, floor, p, q, use_floor, need_param, need_s, tail)

                    fn = torch.compile(_own_code(bwd), dynamic=False, fullgraph=True, options=_options())
                _compiled[key] = _Timed(fn, key)
                fn = _compiled[key]
    return fn


class _Timed:
    """Logs the wall time of the first call (the compile) of a compiled kernel."""

    def __init__(self, fn: Callable, key: tuple) -> None:
        self.fn, self.key, self.first = fn, key, True

    def __call__(self, h: torch.Tensor, *args: Any):
        torch._dynamo.maybe_mark_dynamic(h, 0)
        for x in args[:1]:  # gz (backward) has h's shape
            if isinstance(x, torch.Tensor) and x.dim() == 2:
                torch._dynamo.maybe_mark_dynamic(x, 0)
        if not self.first:
            return self.fn(h, *args)
        t0 = time.perf_counter()
        log.info("compiling rational gate kernel %s (first call; up to tens of seconds)", self.key)
        out = self.fn(h, *args)
        self.first = False
        log.info("compiled rational gate kernel %s in %.1f s", self.key, time.perf_counter() - t0)
        return out


def _disable_compiled(err: BaseException) -> None:
    global _compile_failed
    if _compile_failed is None:
        _compile_failed = f"{type(err).__name__}: {err}"
        log.warning(
            "torch.compile of the rational gate failed; using the fused eager path from now on (%s)", _compile_failed
        )


def _floor_tensor(floor, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(floor, dtype=like.dtype, device=like.device).detach().reshape(())


def _fwd(backend: str, h, a, b, c_in, c_out, s, floor, use_floor, tail=False):
    if backend == "compiled" and _compile_failed is None:
        u = c_in if s is None else c_in * s
        v = c_out if s is None else c_out * s
        try:
            fn = _get_compiled("fwd", a.shape[0] - 1, b.shape[0], use_floor, tail)
            return fn(h, a, b, u, v, _floor_tensor(floor, h))
        except Exception as e:  # noqa: BLE001 - a compiler failure: run eagerly, and for good if that works
            out = _fwd_fused(h, a, b, c_in, c_out, s, float(floor), use_floor, tail)  # re-raises the caller's errors
            _disable_compiled(e)
            return out
    return _fwd_fused(h, a, b, c_in, c_out, s, float(floor), use_floor, tail)


def _support_fused(h, a, b, c_in, s, floor: float, tail: bool = False) -> torch.Tensor:
    """r(t) > floor [m, d] (bool) by row chunks (temporaries: ~3 chunk-sized tensors)."""
    al, bl = a.tolist(), b.tolist()
    u = c_in if s is None else c_in * s
    out = torch.empty(h.shape, dtype=torch.bool, device=h.device)
    for sl in _chunks(h):
        torch.gt(_r_fused(al, bl, h[sl] / u, tail), floor, out=out[sl])
    return out


def _bwd(backend: str, h, gz, a, b, c_in, c_out, s, floor, use_floor, need_param, need_s, tail=False):
    args = (h, gz, a, b, c_in, c_out, s)
    if backend == "compiled" and _compile_failed is None:
        try:
            return _get_compiled("bwd", a.shape[0] - 1, b.shape[0], use_floor, need_param, need_s, tail)(
                *args, _floor_tensor(floor, h)
            )
        except Exception as e:  # noqa: BLE001
            out = _bwd_fused(*args, float(floor), use_floor, need_param, need_s, tail)
            _disable_compiled(e)
            return out
    return _bwd_fused(*args, float(floor), use_floor, need_param, need_s, tail)


class RationalGateFunction(torch.autograd.Function):
    """Autograd node of the rational gate that saves only ``h`` (plus the small parameters).

    ``apply(h, a, b, c_in, c_out, s, floor, use_floor, backend, tail)`` with h [m, d_sae] contiguous, a [p + 1],
    b [q], c_in / c_out 0-dim, s [d_sae], [1] or None, floor a float or 0-dim tensor (r units, no gradient),
    ``use_floor`` False for the raw rational, ``backend`` "fused" or "compiled". Returns z [m, d_sae].
    Backward recomputes t, P, P', B, B' from ``h`` and returns dL/dh plus the parameter gradients
    (sums over all entries; over rows for s). Once differentiable (no double backward).
    Sources: Molina et al. 2020 (safe PAU), Boullé et al. 2020.
    """

    @staticmethod
    def forward(ctx, h, a, b, c_in, c_out, s, floor, use_floor, backend, tail=False):  # noqa: D102
        ctx.use_floor, ctx.backend, ctx.floor, ctx.tail = use_floor, backend, float(floor), tail  # forward-time
        ctx.save_for_backward(h, a, b, c_in, c_out, s)
        return _fwd(backend, h, a, b, c_in, c_out, s, floor, use_floor, tail)

    @staticmethod
    @once_differentiable
    def backward(ctx, gz):  # noqa: D102
        h, a, b, c_in, c_out, s = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_param = any(need[1:5])
        need_s = s is not None and need[5]
        gh, params, gs = _bwd(
            ctx.backend, h, gz.contiguous(), a, b, c_in, c_out, s, ctx.floor, ctx.use_floor, need_param, need_s,
            ctx.tail,
        )  # fmt: skip
        ga = gb = g_cin = g_cout = None
        if need_param:
            ga, gb, g_cin, g_cout = params
        if gs is not None and gs.shape != s.shape:  # one scale shared by all latents
            gs = gs.sum().reshape(s.shape)
        return (gh if need[0] else None, ga, gb, g_cin, g_cout, gs, None, None, None, None)


# -- public API ---------------------------------------------------------------------------------------------
def resolve_impl(impl: str | None = None, numel: int | None = None) -> str:
    """The implementation to run, "eager" | "fused" | "compiled".

    ``impl``, else ``$RSAE_GATE_IMPL``, else ``"auto"``. "auto" is "compiled" for inputs of at least
    :data:`AUTO_COMPILE_MIN_ELEMS` elements (``numel``; None counts as large) and "fused" below, where a
    one-off compile (seconds to tens of seconds) cannot pay off. "compiled" becomes "fused" after a compile
    failure or without ``torch.compile``.

    Raises:
        ValueError: an unknown name.
    """
    name = (impl or os.environ.get(ENV_VAR) or "auto").strip().lower()
    if name not in IMPLS:
        raise ValueError(f"unknown rational gate implementation {name!r}; expected one of {IMPLS}")
    if name == "auto":
        name = "compiled" if numel is None or numel >= AUTO_COMPILE_MIN_ELEMS else "fused"
    if name == "compiled" and (_compile_failed is not None or not hasattr(torch, "compile")):
        name = "fused"
    return name


def _check(h, a, b, c_in, c_out, s) -> None:
    if not h.is_floating_point():
        raise TypeError(f"h must be a floating tensor, got {h.dtype}")
    if h.dim() < 1:
        raise ValueError("h must have at least one dimension [..., d_sae]")
    if a.dim() != 1 or a.numel() < 1 or b.dim() != 1:
        raise ValueError(f"a must be 1-D [p + 1] and b 1-D [q]; got {tuple(a.shape)}, {tuple(b.shape)}")
    if c_in.numel() != 1 or c_out.numel() != 1:
        raise ValueError("c_in and c_out must be scalars (0-dim tensors)")
    if s is not None and (s.dim() != 1 or s.shape[0] not in (1, h.shape[-1])):
        raise ValueError(f"s must be [d_sae] = [{h.shape[-1]}] or [1], got {tuple(s.shape)}")


def _apply(h, a, b, c_in, c_out, s, floor, use_floor, impl, tail=False):
    c_in, c_out = (torch.as_tensor(c, dtype=h.dtype, device=h.device) for c in (c_in, c_out))
    _check(h, a, b, c_in, c_out, s)
    backend = resolve_impl(impl, h.numel())
    if backend == "eager":
        return (
            rational_gate_eager(h, a, b, c_in, c_out, s, floor, tail)
            if use_floor
            else rational_raw_eager(h, a, b, c_in, c_out, s, tail)
        )
    dt = h.dtype
    a, b, c_in, c_out = a.to(dt), b.to(dt), c_in.reshape(()), c_out.reshape(())
    s = s.to(dt) if s is not None else None
    if isinstance(floor, torch.Tensor):
        floor = floor.detach()
    shape = h.shape
    h2 = h.reshape(-1, shape[-1]).contiguous()
    z = RationalGateFunction.apply(h2, a, b, c_in, c_out, s, floor, use_floor, backend, tail)
    return z.reshape(shape)


def rational_gate(
    h: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    c_in: torch.Tensor,
    c_out: torch.Tensor,
    s: torch.Tensor | None = None,
    floor: float | torch.Tensor = 0.0,
    impl: str | None = None,
    tail: bool = False,
) -> torch.Tensor:
    """Rational gate with exact zeros: ``z = C_out * s * r(t)`` where ``r(t) > floor``, else 0.

    Args:
        h: pre-activations [..., d_sae] (units of h), float32 (float64 works, e.g. for gradcheck).
        a: numerator coefficients [p + 1], ascending (a_0 .. a_p).
        b: denominator coefficients [q] of t^1 .. t^q (Q = 1 + |B|, so Q >= 1: no poles).
        c_in, c_out: positive scalars (0-dim tensors or floats; pass ``exp(log_c)``): t = h / (c_in * s), z in
            units of c_out * s.
        s: per-latent positive scales [d_sae] (or [1], shared), or None (all ones).
        floor: exact-zero threshold in r units (python float or 0-dim tensor; no gradient).
        impl: "auto" | "compiled" | "fused" | "eager"; default ``$RSAE_GATE_IMPL`` or "auto".
        tail: the linear tail beyond the fitted interval (module docstring): r at t clamped to [-1, 1],
            plus max(t - 1, 0).

    Returns:
        z [..., d_sae], h's dtype; differentiable w.r.t. h, a, b, c_in, c_out, s (zero gradient where
        z == 0 by the floor; d|B|/dB = sign(B)).

    Raises:
        ValueError: bad shapes or an unknown ``impl``. TypeError: non-floating ``h``.

    Sources: Molina, Schramowski & Kersting 2020 (Padé Activation Units, "safe PAU");
    Boullé, Nakatsukasa & Townsend 2020 ("Rational neural networks").
    """
    return _apply(h, a, b, c_in, c_out, s, floor, True, impl, tail)


def rational_raw(
    h: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    c_in: torch.Tensor,
    c_out: torch.Tensor,
    s: torch.Tensor | None = None,
    impl: str | None = None,
    tail: bool = False,
) -> torch.Tensor:
    """The rational without the floor: ``raw = C_out * s * P(t) / (1 + |B(t)|)``, ``t = h / (C_in * s)``.

    Shapes, units, errors and sources as :func:`rational_gate`; returns raw [..., d_sae].
    """
    return _apply(h, a, b, c_in, c_out, s, 0.0, False, impl, tail)


@torch.no_grad()
def rational_support(
    h: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    c_in: torch.Tensor,
    s: torch.Tensor | None = None,
    floor: float | torch.Tensor = 0.0,
    impl: str | None = None,
    tail: bool = False,
) -> torch.Tensor:
    """The support of :func:`rational_gate`: ``r(t) > floor`` with ``t = h / (C_in * s)``, bool [..., d_sae].

    Outside it the gate is exactly 0 and passes no gradient to h or to any gate parameter (the floor's mask
    multiplies every backward term), so a training step may restrict its decoder and its gradients to these
    entries (:mod:`rsae.sparse`). Compiled: one fused pass writing r, then ``r > floor``; fused: row chunks
    writing only the mask (``impl`` as :func:`rational_gate`, "eager" runs the fused path). Inside the support the gate
    can still be 0 where C_out s r(t) underflows or r(t) = 0 > floor (a negative floor); such entries carry a
    gradient, as in :func:`rational_gate`. No autograd.

    Args: as :func:`rational_gate` (``c_out`` is not needed). Returns: bool tensor of h's shape.
    Raises: ValueError / TypeError: as :func:`rational_gate`.
    """
    c_in = torch.as_tensor(c_in, dtype=h.dtype, device=h.device)
    _check(h, a, b, c_in, c_in, s)
    dt = h.dtype
    a, b, c_in = a.detach().to(dt), b.detach().to(dt), c_in.detach().reshape(())
    s = s.detach().to(dt) if s is not None else None
    floor = floor.detach() if isinstance(floor, torch.Tensor) else floor
    shape = h.shape
    h2 = h.detach().reshape(-1, shape[-1]).contiguous()
    if resolve_impl(impl, h2.numel()) == "compiled":
        u = c_in if s is None else c_in * s
        try:
            fn = _get_compiled("support", a.shape[0] - 1, b.shape[0], tail)
            return torch.gt(fn(h2, a, b, u), _floor_tensor(floor, h2)).reshape(shape)
        except Exception as e:  # noqa: BLE001 - a compiler failure: run the fused path, and for good
            out = _support_fused(h2, a, b, c_in, s, float(floor), tail)
            _disable_compiled(e)
            return out.reshape(shape)
    return _support_fused(h2, a, b, c_in, s, float(floor), tail).reshape(shape)


def compile_status() -> dict[str, Any]:
    """Diagnostics: compiled variants built so far and the compile failure (None if none)."""
    return {"variants": sorted(map(str, _compiled)), "failed": _compile_failed}

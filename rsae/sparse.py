"""Sparse-aware SAE training step: the decoder and every gradient computed from the active latents only.

The objective is :func:`rsae.saes.sae_loss` (MSE + lambda * decoder-norm-weighted L1, ``rsae/train.py``):

    h = (x - b_dec) @ W_enc + b_enc,  z = gate(h),  x_hat = z @ W_dec + b_dec,
    L = mean_i ||x_i - x_hat_i||^2 + lambda * mean_i sum_j |z_ij| ||W_dec[j]||.

For the RSAE's rational gate (and the ReLU control) z is exactly 0 outside its support S (r(t) <= floor;
h <= 0 for ReLU), and there the gate passes no gradient at all: dz/dh, dz/da, dz/db, dz/dC and dz/ds carry the
support's mask (``rsae/kernels.py``; ``tests/core/test_kernels.py::test_exact_zeros_and_no_gradient_below_floor``).
So with g = dL/dx_hat [n, d_in] and dL/dh = 0 off S, every product but the encoder's forward GEMM only needs
the nnz = |S| active (row, latent) pairs (L0 20-70 of 2,304 latents in a default upgrade: ~2% dense):

    forward   x_hat = z_S @ W_dec            embedding_bag over each row's active latents (CSR)
    backward  dL/dz_S = (g @ W_dec^T)_S      sampled dense-dense product at S (torch.sparse.sampled_addmm)
              dW_dec = z_S^T @ g             embedding_bag over each latent's active rows (CSC)
              dW_enc = x^T @ (dL/dh)_S       embedding_bag over each latent's active rows, transposed
              db_dec = sum_i g_i - (sum_i dL/dh_i) @ W_enc^T   (a GEMV: no input gradient is formed)

i.e. one dense GEMM (2 n d_in d_sae FLOPs) plus O(nnz d_in), against six GEMMs for autograd on the dense
formula (two forward; dL/dz, dW_dec, dW_enc and, because b_dec is subtracted from the input, dL/dx). The
gate runs once densely to find S (one fused pass writing a bool mask, :func:`rsae.kernels.rational_support`)
and otherwise on the nnz values only. The same products as dense GEMMs (``dense`` kernels, four GEMMs) are
used instead when the batch's measured density nnz / (n d_sae) exceeds :data:`SPARSE_MAX_DENSITY`.

Exactness: the loss and every parameter gradient equal autograd's on :func:`rsae.saes.sae_loss` up to
floating-point summation order (``tests/core/test_sparse.py``, float64 and float32, incl. all-zero rows, an
empty support and a fully dense batch). Sparse-kernel design after the sparse decoders of TopK SAEs (Gao et
al. 2024, "Scaling and evaluating sparse autoencoders", section on sparse kernels); the operators are
PyTorch's (``torch.nn.functional.embedding_bag`` with per-sample weights, ``torch.sparse.sampled_addmm``).

Not covered (their gradients leave the support; they keep the dense path): the JumpReLU gate (its threshold's
straight-through estimator takes gradient from inactive entries within the bandwidth), TopK SAEs and TopK
upgrades (per-token thresholds that depend on h), and any loss other than :func:`rsae.saes.sae_loss`.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from . import kernels
from .saes import SAE, LossFn, RationalGate, RationalSAE, ReLUSAE, sae_loss
from .saes.base import SAE as _BaseSAE

log = logging.getLogger(__name__)

PATHS = ("auto", "dense", "sparse")
"""Accepted training-step paths: "dense" = autograd on :func:`rsae.saes.sae_loss` (the original step, bit for
bit); "sparse" = :class:`SparseStep` with the sparse kernels whatever the density; "auto" = :class:`SparseStep`
choosing sparse or dense kernels per batch by its measured density (:data:`SPARSE_MAX_DENSITY`)."""

SPARSE_MAX_DENSITY = 0.1
""""auto" runs the sparse kernels on a batch whose support holds at most this fraction of its n x d_sae
entries, else the dense-kernel variant of the same step. Measured with ``bench/sparse_step.py`` (2-core CPU,
d_in 576): the sparse step and the dense-kernel step cost the same near density 0.2 at d_sae 2,304 (batch
1,024 and 4,096) and near 0.14 at d_sae 16,384 (batch 4,096); at 0.1 the sparse step was still 1.6-1.9x
faster at both. RSAEs run at 0.003-0.03 (``docs/performance.md``)."""


# -- gates --------------------------------------------------------------------------------------------------
class _ReLUGate:
    """z = relu(h): support h > 0, dz/dh = 1 on it, no parameters."""

    n_params = 0

    def bind(self, params: tuple[torch.Tensor, ...]) -> None:
        """Nothing to bind."""

    def support(self, h: torch.Tensor) -> torch.Tensor:
        """Bool mask h > 0 [n, d]."""
        return h > 0

    def values(self, hv: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """z at support entries with pre-activations ``hv`` [nnz] of latents ``cols`` [nnz]."""
        return hv

    def dense(self, h: torch.Tensor) -> torch.Tensor:
        """z [n, d]."""
        return torch.relu(h)

    def grad_sparse(self, hv, cols, gz, needs) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """(dL/dh at the entries, parameter gradients) from dL/dz ``gz`` [nnz]."""
        return gz, []

    def grad_dense(self, h, gz, needs) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """(dL/dh [n, d], parameter gradients) from dL/dz [n, d] (ReLU's backward: 0 where h <= 0)."""
        return torch.where(h > 0, gz, torch.zeros((), dtype=gz.dtype, device=gz.device)), []


class _RationalGate:
    """The RSAE's :class:`rsae.saes.RationalGate` (``rsae/kernels.py`` formulas); parameters a, b, log C_in,
    log C_out, log s (the last two scales as exp of the stored logs, as the module does)."""

    n_params = 5

    def __init__(self, gate: RationalGate) -> None:
        self.p, self.q, self.floor, self.tail = gate.p, gate.q, float(gate.floor), gate.tail

    def bind(self, params: tuple[torch.Tensor, ...]) -> None:
        """Take the parameter values of this step (detached): a, b, log C_in, log C_out, log s."""
        self.a, self.b, lci, lco, ls = (t.detach() for t in params)
        self.c_in, self.c_out, self.s = lci.exp(), lco.exp(), ls.exp()

    def support(self, h: torch.Tensor) -> torch.Tensor:
        """Bool mask r(t) > floor [n, d] (:func:`rsae.kernels.rational_support`)."""
        return kernels.rational_support(h, self.a, self.b, self.c_in, self.s, self.floor, tail=self.tail)

    def _s_at(self, cols: torch.Tensor) -> torch.Tensor:
        return self.s.index_select(0, cols) if self.s.numel() > 1 else self.s

    def values(self, hv: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """phi(h) at support entries (no floor: they are in it), ``hv`` [nnz] of latents ``cols`` [nnz]."""
        s = self._s_at(cols)
        u, v = self.c_in * s, self.c_out * s
        return kernels._fwd_math(hv, self.a, self.b, u, v, self.floor, self.p, self.q, False, self.tail)

    def dense(self, h: torch.Tensor) -> torch.Tensor:
        """z [n, d] by the fused / compiled gate kernel (:func:`rsae.kernels.rational_gate`)."""
        return kernels.rational_gate(h, self.a, self.b, self.c_in, self.c_out, self.s, self.floor, tail=self.tail)

    def _param_grads(self, params, gs_per_latent, needs) -> list[torch.Tensor | None]:
        """[da, db, dlog C_in, dlog C_out, dlog s] from the kernel's (da, db, dC_in, dC_out) and dL/ds [d]."""
        out: list[torch.Tensor | None] = [None] * 5
        if params is not None:
            ga, gb, g_cin, g_cout = params
            out[:4] = [ga, gb, g_cin * self.c_in, g_cout * self.c_out]
        if gs_per_latent is not None:
            gs = gs_per_latent if self.s.numel() > 1 else gs_per_latent.sum().reshape(self.s.shape)
            out[4] = gs * self.s
        return [g if need else None for g, need in zip(out, needs)]

    def grad_sparse(self, hv, cols, gz, needs) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """(dL/dh [nnz], gate parameter gradients) from dL/dz ``gz`` [nnz] at support entries."""
        need_param, need_s = any(needs[:4]), needs[4]
        gh, params, gs = kernels._bwd_math(
            hv[None], gz[None], self.a, self.b, self.c_in, self.c_out, self._s_at(cols), self.floor,
            self.p, self.q, False, need_param, need_s, self.tail,
        )  # fmt: skip
        if gs is not None:
            gs = torch.zeros(self.s.shape[0], dtype=gs.dtype, device=gs.device).index_add_(0, cols, gs)
        return gh[0], self._param_grads(params, gs, needs)

    def grad_dense(self, h, gz, needs) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """(dL/dh [n, d], gate parameter gradients) from dL/dz [n, d] (the kernel's own backward)."""
        need_param, need_s = any(needs[:4]), needs[4]
        backend = kernels.resolve_impl(None, h.numel())
        backend = "fused" if backend == "eager" else backend
        gh, params, gs = kernels._bwd(
            backend, h, gz, self.a, self.b, self.c_in, self.c_out, self.s, self.floor, True, need_param, need_s,
            self.tail,
        )  # fmt: skip
        return gh, self._param_grads(params, gs, needs)


def _gate_of(sae: SAE) -> tuple[Any, tuple[torch.Tensor, ...]] | None:
    """The step's gate evaluator and its parameter tensors for ``sae``, or None when the sparse step does not
    apply (a gate whose gradient leaves its support, or a subclass that changes the forward)."""
    cls = type(sae)
    plain = cls.pre_acts is _BaseSAE.pre_acts and cls.encode is _BaseSAE.encode and cls.decode is _BaseSAE.decode
    if not plain:
        return None
    if isinstance(sae, ReLUSAE) and cls.gate is ReLUSAE.gate:
        return _ReLUGate(), ()
    if isinstance(sae, RationalSAE) and cls.gate is RationalSAE.gate and sae.topk_k is None:
        g = sae.gate_fn
        if type(g) is RationalGate:
            return _RationalGate(g), (g.a, g.b, g.log_c_in, g.log_c_out, g.log_scale)
    return None


def supports(sae: SAE) -> bool:
    """Whether :class:`SparseStep` can train ``sae`` (ReLU SAEs; RSAEs without the per-token TopK rule)."""
    return _gate_of(sae) is not None


# -- the step -----------------------------------------------------------------------------------------------
@dataclass
class _Cfg:
    gate: Any
    lam: float
    kernels: str  # "auto" | "sparse" | "dense"
    apply_b_dec: bool
    info: dict[str, Any]


def _csr_offsets(counts: torch.Tensor) -> torch.Tensor:
    """[k + 1] offsets (0, cumsum) of ``counts`` [k]."""
    out = counts.new_zeros(counts.shape[0] + 1)
    torch.cumsum(counts, 0, out=out[1:])
    return out


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A CSR tensor from valid parts (built by this module: no invariant check), without torch's one-time
    "sparse CSR support is in beta" warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


class _SparseSAEStepFn(torch.autograd.Function):
    """(loss, mse, l1, l0) of :func:`rsae.saes.sae_loss` with a backward that uses the support only.

    ``apply(cfg, x, W_enc, b_enc, W_dec, b_dec, *gate_params)``: x [n, d_in]; returns four 0-dim tensors,
    only ``loss`` differentiable. x gets no gradient. Once differentiable.
    """

    @staticmethod
    def forward(ctx, cfg: _Cfg, x, W_enc, b_enc, W_dec, b_dec, *gparams):  # noqa: D102
        gate = cfg.gate
        gate.bind(gparams)
        n = x.shape[0]
        xc = x - b_dec if cfg.apply_b_dec else x
        h = torch.addmm(b_enc, xc, W_enc)
        mask = gate.support(h)
        nnz = int(torch.count_nonzero(mask))  # (a bool .sum() converts the whole mask to int64 first)
        density = nnz / max(1, mask.numel())
        sparse = cfg.kernels == "sparse" or (cfg.kernels == "auto" and density <= SPARSE_MAX_DENSITY)
        cfg.info.update(density=density, kernels="sparse" if sparse else "dense")
        norms = W_dec.norm(dim=1)
        if sparse:
            d_sae, hf = h.shape[1], h.view(-1)
            flat = mask.view(-1).nonzero().squeeze(1)  # row-major: i d_sae + j
            rows = flat.div(d_sae, rounding_mode="floor")
            cols = flat - rows * d_sae
            hv = hf.index_select(0, flat)
            zv = gate.values(hv, cols)
            offsets = _csr_offsets(torch.bincount(rows, minlength=n))[:-1]
            x_hat = F.embedding_bag(cols, W_dec, offsets, mode="sum", per_sample_weights=zv) + b_dec
            l1 = (zv.abs() * norms.index_select(0, cols)).sum() / n
            l0 = (zv != 0).sum() / n
            # The same support column by column (rows ascending in each), for the products with the transpose
            # in backward: a stable sort by latent (measured 1.4 ms for 200k entries; mask.t().nonzero() 19 ms).
            perm = torch.sort(cols.to(torch.int32), stable=True).indices
            rows_t, cols_t, h_t, z_t = (t.index_select(0, perm) for t in (rows, cols, hv, zv))
            col_ptr = _csr_offsets(torch.bincount(cols, minlength=d_sae))
            saved = (rows_t, cols_t, col_ptr, h_t, z_t)
        else:
            z = gate.dense(h)
            x_hat = torch.addmm(b_dec, z, W_dec)
            l1 = (z.abs() * norms).sum(-1).mean()
            l0 = (z != 0).sum(-1).float().mean()
            saved = (h, z)
        diff = x - x_hat
        mse = diff.pow(2).sum(-1).mean()
        loss = mse + cfg.lam * l1
        l0 = l0.to(loss.dtype)
        ctx.cfg, ctx.sparse, ctx.n = cfg, sparse, n
        ctx.save_for_backward(xc, W_enc, W_dec, norms, diff, *saved)
        ctx.mark_non_differentiable(mse, l1, l0)
        return loss, mse, l1, l0

    @staticmethod
    def backward(ctx, g_loss, *_unused):  # noqa: D102
        cfg, n, gate = ctx.cfg, ctx.n, ctx.cfg.gate
        xc, W_enc, W_dec, norms, diff, *saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]  # W_enc, b_enc, W_dec, b_dec, *gate params
        g = diff * (-2.0 / n) * g_loss  # dL/dx_hat [n, d_in]
        c = g_loss * (cfg.lam / n)  # dL/d|z_ij| / ||W_dec[j]||
        if ctx.sparse:
            rows_t, cols_t, col_ptr, h_t, z_t = saved
            d_sae = W_dec.shape[0]
            pattern = _csr(col_ptr, rows_t, torch.zeros_like(z_t), (d_sae, n))
            gz = torch.sparse.sampled_addmm(pattern, W_dec, g.t(), beta=0.0).values()
            gz = gz + c * torch.sign(z_t) * norms.index_select(0, cols_t)
            gh, gparams = gate.grad_sparse(h_t, cols_t, gz, needs[4:])
            offsets = col_ptr[:-1]
            dW_dec = F.embedding_bag(rows_t, g, offsets, mode="sum", per_sample_weights=z_t)
            abs_sum = torch.zeros(d_sae, dtype=g.dtype, device=g.device).index_add_(0, cols_t, z_t.abs())
            dW_enc = F.embedding_bag(rows_t, xc, offsets, mode="sum", per_sample_weights=gh).t() if needs[0] else None
            db_enc = torch.zeros(d_sae, dtype=g.dtype, device=g.device).index_add_(0, cols_t, gh)
        else:
            h, z = saved
            gz = torch.addmm(c * torch.sign(z) * norms, g, W_dec.t())
            gh, gparams = gate.grad_dense(h, gz, needs[4:])
            dW_dec = z.t() @ g
            abs_sum = z.abs().sum(0)
            dW_enc = xc.t() @ gh if needs[0] else None
            db_enc = gh.sum(0)
        # d||W_dec[j]|| / dW_dec[j] = W_dec[j] / ||W_dec[j]|| (0 for a zero row, as torch.linalg.vector_norm)
        unit = W_dec / torch.where(norms > 0, norms, torch.ones((), dtype=norms.dtype))[:, None]
        dW_dec = dW_dec.addcmul_(unit, (c * abs_sum)[:, None]) if needs[2] else None
        db_dec = None
        if needs[3]:
            db_dec = g.sum(0)
            if cfg.apply_b_dec:
                db_dec = db_dec - W_enc @ db_enc
        return (None, None, dW_enc, db_enc if needs[1] else None, dW_dec, db_dec, *gparams)


class SparseStep:
    """The :func:`rsae.saes.sae_loss` objective as a ``loss_fn`` for :func:`rsae.train.train_sae`, computed by
    the sparse-aware step (module docstring): same loss, same parts, same gradients up to float rounding.

    Args:
        kernels: "auto" (per batch by density, :data:`SPARSE_MAX_DENSITY`), "sparse" or "dense" (the products
            as GEMMs in the same node: no input gradient, 4 GEMMs instead of autograd's 6).

    ``last`` holds the last batch's ``density`` (support / (n d_sae)) and the ``kernels`` it ran.

    Raises (on call):
        ValueError: an SAE this step cannot train (:func:`supports`) or an unknown ``kernels``.
    """

    def __init__(self, kernels: str = "auto") -> None:
        if kernels not in PATHS:
            raise ValueError(f"unknown kernels {kernels!r}; expected one of {PATHS}")
        self.kernels = kernels
        self.last: dict[str, Any] = {}

    def __call__(self, sae: SAE, x: torch.Tensor, l1_coefficient: float) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, parts) of :func:`rsae.saes.sae_loss` on x [n, d_in]; parts: loss, mse, l1, l0 (floats)."""
        found = _gate_of(sae)
        if found is None:
            raise ValueError(f"the sparse training step does not support {type(sae).__name__} (rsae.sparse)")
        gate, gparams = found
        cfg = _Cfg(gate, float(l1_coefficient), self.kernels, sae.apply_b_dec_to_input, self.last)
        x2 = x.reshape(-1, x.shape[-1])
        loss, mse, l1, l0 = _SparseSAEStepFn.apply(cfg, x2, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, *gparams)
        return loss, {"loss": loss.item(), "mse": mse.item(), "l1": l1.item(), "l0": l0.item()}


def training_loss(sae: SAE, loss_fn: LossFn | None, path: str) -> LossFn:
    """The ``loss_fn`` :func:`rsae.train.train_sae` should run for ``sae`` on ``path`` ("auto" | "dense" |
    "sparse"): the sparse-aware :class:`SparseStep` when the objective is :func:`rsae.saes.sae_loss` (``loss_fn``
    None or it) and :func:`supports` ``sae``; otherwise ``loss_fn`` (or :func:`rsae.saes.sae_loss`) unchanged.
    "sparse" runs the sparse kernels on every batch, "auto" picks per batch by density; "dense" is the original
    autograd step, bit for bit. A "sparse" request the SAE cannot take keeps the dense step (logged).

    Raises:
        ValueError: an unknown ``path``.
    """
    if path not in PATHS:
        raise ValueError(f"unknown training-step path {path!r}; expected one of {PATHS}")
    base = loss_fn or sae_loss
    if path == "dense" or base is not sae_loss:
        return base
    if not supports(sae):
        if path == "sparse":
            log.info("sparse training step not available for %s; using the dense step", type(sae).__name__)
        return base
    return SparseStep(path)

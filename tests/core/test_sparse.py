"""rsae.sparse: the sparse-aware training step gives the dense step's loss and every parameter's gradient (float
rounding apart) on random states, all-zero rows, an empty support and a fully dense batch; routing by path;
train_sae on either path; the support kernel; the benchmark's smoke run."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from rsae import kernels as K
from rsae.remez import remez_fit
from rsae.saes import JumpReLUSAE, RationalSAE, ReLUSAE, TopKSAE, sae_loss
from rsae.sparse import SPARSE_MAX_DENSITY, SparseStep, supports, training_loss
from rsae.train import train_sae

D_IN, D_SAE, N = 24, 96, 160


def _relu(dtype, seed=0, apply_b_dec=True) -> ReLUSAE:
    g = torch.Generator().manual_seed(seed)
    sae = ReLUSAE(D_IN, D_SAE, apply_b_dec_to_input=apply_b_dec)
    sae.init_weights(g)
    with torch.no_grad():
        sae.W_enc.add_(0.05 * torch.randn(D_IN, D_SAE, generator=g))  # untie
        sae.b_enc.normal_(0.0, 0.1, generator=g)
        sae.b_dec.normal_(0.0, 0.3, generator=g)
        sae.W_dec[3].zero_()  # a dead decoder row: its norm's gradient is 0 on both paths
    return sae.to(dtype)


def _rsae(dtype, *, trained_scale: bool, seed=0, apply_b_dec=True, tail=False) -> RationalSAE:
    teacher = _relu(torch.float32, seed, apply_b_dec)
    fit = remez_fit("relu", p=5, q=4)
    scale = torch.rand(D_SAE, generator=torch.Generator().manual_seed(seed + 7)) + 0.5 if trained_scale else None
    c_in = 0.1 if tail else 0.6  # with the tail: many t beyond [-1, 1]
    rational = {"tail": "linear"} if tail else None
    sae = RationalSAE.from_teacher(
        teacher, a=fit.a, b=fit.b, c_in=c_in, c_out=0.8, floor=0.05, scale=scale, rational=rational
    )
    assert sae.gate_fn.tail is tail
    return sae.to(dtype)


def _x(dtype, seed=1) -> torch.Tensor:
    x = torch.randn(N, D_IN, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 0.8
    x[[0, 7, 50]] = 0  # all-zero rows
    return x


def _loss_and_grads(sae, loss_fn, x, lam):
    sae.zero_grad(set_to_none=True)
    loss, parts = loss_fn(sae, x, lam)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}
    return loss.detach(), parts, grads


def _assert_same(sae, x, lam, kernels, dtype):
    ref_loss, ref_parts, ref = _loss_and_grads(sae, sae_loss, x, lam)
    step = SparseStep(kernels)
    loss, parts, got = _loss_and_grads(sae, step, x, lam)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(loss, ref_loss, **tol)
    for k in ("mse", "l1", "l0"):
        assert parts[k] == pytest.approx(ref_parts[k], rel=tol["rtol"], abs=tol["atol"]), k
    assert got.keys() == ref.keys()
    for n in ref:
        scale = max(1.0, ref[n].abs().max().item())
        torch.testing.assert_close(got[n], ref[n], rtol=tol["rtol"], atol=tol["atol"] * scale, msg=n)
    return step.last


MODELS = {
    "rsae-trained-scales": lambda dt: _rsae(dt, trained_scale=True),
    "rsae-fixed-scales": lambda dt: _rsae(dt, trained_scale=False),
    "rsae-no-b_dec-in-input": lambda dt: _rsae(dt, trained_scale=True, apply_b_dec=False),
    "rsae-linear-tail": lambda dt: _rsae(dt, trained_scale=True, tail=True),
    "relu": lambda dt: _relu(dt),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kernels", ["sparse", "dense"])
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_same_loss_and_gradients_as_autograd(model, kernels, dtype, seed):
    sae = MODELS[model](dtype)
    last = _assert_same(sae, _x(dtype, seed), 0.3 * seed, kernels, dtype)
    assert last["kernels"] == kernels and 0 < last["density"] < 1


@pytest.mark.parametrize("kernels", ["sparse", "dense"])
def test_fully_dense_batch_and_empty_support(kernels):
    """Every entry active (floor below every r; ReLU with a large bias), and no entry active (the loss is the
    MSE of b_dec alone, and only b_dec gets a non-zero gradient)."""
    dt = torch.float64
    x = _x(dt)
    rsae = _rsae(dt, trained_scale=True)
    rsae.set_floor(-1e9)
    assert _assert_same(rsae, x, 0.2, kernels, dt)["density"] == 1.0
    relu = _relu(dt)
    with torch.no_grad():
        relu.b_enc.fill_(100.0)
    assert _assert_same(relu, x, 0.2, kernels, dt)["density"] == 1.0
    rsae.set_floor(1e9)
    assert _assert_same(rsae, x, 0.2, kernels, dt)["density"] == 0.0
    for n, p in rsae.named_parameters():
        assert (p.grad.abs().sum() > 0) == (n == "b_dec"), n


def test_auto_picks_kernels_by_density():
    sae, x = _rsae(torch.float32, trained_scale=False), _x(torch.float32)
    with torch.no_grad():
        r = sae.gate_unit(sae.pre_acts(x)).flatten()
    step = SparseStep("auto")
    for density, want in ((SPARSE_MAX_DENSITY / 2, "sparse"), (min(1.0, SPARSE_MAX_DENSITY * 2), "dense")):
        sae.set_floor(float(r.kthvalue(r.numel() - int(density * r.numel())).values))
        step(sae, x, 0.1)
        assert step.last["kernels"] == want
        assert abs(step.last["density"] - density) < 0.01


def test_routing_by_path_and_family():
    rsae, relu = _rsae(torch.float32, trained_scale=True), _relu(torch.float32)
    for sae in (rsae, relu):
        assert supports(sae)
        assert training_loss(sae, None, "dense") is sae_loss
        assert isinstance(training_loss(sae, None, "auto"), SparseStep)
        assert isinstance(training_loss(sae, sae_loss, "sparse"), SparseStep)

    def custom(sae, x, lam):
        return sae_loss(sae, x, lam)

    assert training_loss(rsae, custom, "sparse") is custom  # another objective keeps the dense step
    topk_rsae = copy.deepcopy(rsae)
    topk_rsae.rational_cfg["topk_k"] = 8
    for sae in (JumpReLUSAE(D_IN, D_SAE), TopKSAE(D_IN, D_SAE, k=8), topk_rsae):
        assert not supports(sae)
        assert training_loss(sae, None, "sparse") is sae_loss
    with pytest.raises(ValueError, match="does not support JumpReLUSAE"):
        SparseStep("sparse")(JumpReLUSAE(D_IN, D_SAE), _x(torch.float32), 0.1)
    with pytest.raises(ValueError, match="unknown training-step path"):
        training_loss(rsae, None, "fast")
    with pytest.raises(ValueError, match="unknown kernels"):
        SparseStep("fast")


class _Store:
    """The part of ActivationStore train_sae uses: shuffled batches from a fixed tensor."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def iter_batches(self, batch_size, seed=0, device="cpu"):
        g = torch.Generator().manual_seed(seed)
        while True:
            yield self.x[torch.randperm(self.x.shape[0], generator=g)[:batch_size]].to(device)


def test_train_sae_sparse_path_follows_the_dense_one_and_dense_is_unchanged():
    """A few Adam steps with the L0 controller: the sparse path's history and weights follow the dense
    path's to float tolerance; path="dense" is bit for bit the default (the original step)."""
    store = _Store(torch.randn(512, D_IN, generator=torch.Generator().manual_seed(5)))
    base = _rsae(torch.float64, trained_scale=True)
    store.x = store.x.double()
    kw = dict(steps=12, batch_size=128, lr=1e-3, l1_coefficient=0.1, l0_target=20.0, l0_adapt_every=3)
    runs = {}
    for name, path in (("default", None), ("dense", "dense"), ("sparse", "sparse"), ("auto", "auto")):
        sae = copy.deepcopy(base)
        hist = train_sae(sae, store, **kw, **({} if path is None else {"path": path}))
        runs[name] = (hist, sae.state_dict())
    assert runs["default"][0] == runs["dense"][0]
    for k, v in runs["default"][1].items():
        assert torch.equal(v, runs["dense"][1][k]), k
    for name in ("sparse", "auto"):
        hist, state = runs[name]
        for a, b in zip(hist, runs["dense"][0]):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-9) and a["l0"] == b["l0"]
            assert a["lambda"] == pytest.approx(b["lambda"], rel=1e-12)
        for k, v in runs["dense"][1].items():
            torch.testing.assert_close(state[k], v, rtol=1e-8, atol=1e-10, msg=f"{name}: {k}")


@pytest.mark.parametrize("floor", [-0.5, 0.0, 0.05])
def test_rational_support_is_where_the_gate_passes_gradient(floor):
    torch.manual_seed(0)
    fit = remez_fit("relu", p=5, q=4)
    a, b = torch.tensor(fit.a), torch.tensor(fit.b)
    h = torch.randn(70, 33) * 2
    s = torch.rand(33) + 0.5
    mask = K.rational_support(h, a, b, torch.tensor(0.7), s, floor)
    r = K.rational_unit(a, b, h / (0.7 * s))
    assert mask.dtype == torch.bool and torch.equal(mask, r > floor)
    hh = h.clone().requires_grad_()
    K.rational_gate(hh, a, b, torch.tensor(0.7), torch.tensor(1.3), s, floor, impl="fused").sum().backward()
    assert torch.all(hh.grad[~mask] == 0)


def test_bench_smoke():
    from bench import sparse_step

    rows = sparse_step.measure(d_sae=128, batch=64, l0=6, steps=1, saelens=False)
    assert [r["path"] for r in rows] == ["autograd", "dense", "sparse"]
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert abs(rows[0]["l0"] - 6) <= 1
    losses = [r["loss"] for r in rows]
    assert max(losses) - min(losses) <= 1e-3 * max(abs(v) for v in losses)


@pytest.mark.skipif(not os.environ.get("RSAE_TEST_COMPILED"), reason="inductor compile; set RSAE_TEST_COMPILED=1")
def test_compiled_support_equals_the_fused_one():
    fit = remez_fit("relu", p=5, q=4)
    a, b = torch.tensor(fit.a), torch.tensor(fit.b)
    h = torch.randn(512, 2304, generator=torch.Generator().manual_seed(0)) * 2
    s = torch.rand(2304) + 0.5
    fused = K.rational_support(h, a, b, torch.tensor(0.7), s, 0.05, impl="fused")
    compiled = K.rational_support(h, a, b, torch.tensor(0.7), s, 0.05, impl="compiled")
    assert K.compile_status()["failed"] is None
    assert (fused != compiled).float().mean() < 1e-5  # ulp-level differences of r at the floor at most

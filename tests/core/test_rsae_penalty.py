"""The RSAE's L0 penalty for JumpReLU upgrades (``finetune.rsae_penalty = "l0"``) and the linear tail on a
JumpReLU upgrade: the effective thresholds C_in s_j t*, the straight-through gradient that reaches only the
per-latent scales, and the tail reproducing entries far above a tiny threshold."""

import pytest
import torch

from rsae.remez import remez_fit
from rsae.saes import JumpReLUSAE, RationalSAE, jumprelu_l0_loss
from rsae.saes.rational import rational_l0_loss


def _upgrade(theta, *, c=0.25, margin=0.025, tail=False, seed=0):
    """A JumpReLU teacher 8 -> len(theta) with thresholds ``theta`` and its RSAE at init (anchor a = c + margin,
    s_j = theta_j / a, floor halfway up the jump)."""
    fit = remez_fit("jumprelu", c=c, p=9, q=8, margin=margin)
    g = torch.Generator().manual_seed(seed)
    teacher = JumpReLUSAE(8, len(theta), bandwidth=0.05)
    teacher.init_weights(g)
    theta = torch.tensor(theta)
    with torch.no_grad():
        teacher.b_enc.normal_(generator=g)
        teacher.log_threshold.copy_(theta.log())
    a = c + margin
    rsae = RationalSAE.from_teacher(
        teacher,
        a=fit.a,
        b=fit.b,
        c_in=1.0,
        c_out=1.0,
        scale=theta / a,
        floor=a / 2,
        rational={"anchor": a, "jump": c, "tail": "linear" if tail else "none"},
    )
    return teacher, rsae, fit


def test_support_edge_is_where_the_gate_starts_passing():
    teacher, rsae, _ = _upgrade((0.5, 2.0, 8.0))
    t_star = rsae.support_edge()
    assert 0.0 < t_star < 0.275  # below the anchor, inside the band where r rises through the floor
    theta_eff = rsae.effective_threshold().detach()
    h = torch.stack([theta_eff * 0.999, theta_eff * 1.001])
    z = rsae.gate(h)
    assert torch.all(z[0] == 0) and torch.all(z[1] != 0)


def test_l0_penalty_reaches_the_support_not_the_weights():
    """The L0 term's gradient reaches the gate parameters that decide the support (the per-latent scales, a, b,
    C_in), not W_enc, b_enc, W_dec, b_dec or C_out: with lam = 0 and lam = 5 those gradients agree. Its descent
    direction lowers L0, and the L0 it reports is the exact non-zero count, equal to the count at the effective
    thresholds C_in s_j t*."""
    teacher, rsae, _ = _upgrade((0.5, 1.0, 2.0, 0.3))
    x = torch.randn(4096, 8, generator=torch.Generator().manual_seed(3)) * 2
    loss_fn = rational_l0_loss()

    def grads(lam):
        rsae.zero_grad(set_to_none=True)
        loss, parts = loss_fn(rsae, x, lam)
        loss.backward()
        return {n: p.grad.clone() for n, p in rsae.named_parameters() if p.grad is not None}, parts

    g0, parts = grads(0.0)
    g5, _ = grads(5.0)
    support = {"gate_fn.log_scale", "gate_fn.a", "gate_fn.b", "gate_fn.log_c_in"}
    for n in g0:
        if n not in support:
            torch.testing.assert_close(g5[n], g0[n], msg=n)
    assert not torch.allclose(g5["gate_fn.log_scale"], g0["gate_fn.log_scale"])  # entries near the thresholds
    # a small step along the L0 term's own gradient lowers the exact L0
    with torch.no_grad():
        before = (rsae.encode(x) != 0).sum().item()
        for n, p in rsae.named_parameters():
            if n in support:
                p -= 1e-3 * (g5[n] - g0[n]) / (g5[n] - g0[n]).abs().max().clamp(min=1e-12)
        assert (rsae.encode(x) != 0).sum().item() <= before
    h = rsae.pre_acts(x)
    assert parts["l0"] == pytest.approx(
        (teacher.pre_acts(x) > rsae.effective_threshold()).sum(-1).float().mean().item(), abs=0.05
    )
    _, tp = jumprelu_l0_loss(teacher, x, 1.0)
    assert tp["l0"] == pytest.approx(parts["l0"], abs=0.5)
    del h


def test_linear_tail_reproduces_entries_far_above_tiny_thresholds():
    """A latent with a tiny threshold (0.01) fires at h up to 100 theta: without the tail those values are the
    rational extrapolated far outside [-1, 1]; with it they are h up to the fit's error (in units of s_j)."""
    theta = (0.01, 0.02, 1.0)
    teacher, plain, fit = _upgrade(theta, tail=False)
    _, tailed, _ = _upgrade(theta, tail=True)
    h = torch.linspace(0.0, 1.0, 5001)[:, None].expand(-1, 3) * torch.tensor([1.0, 2.0, 4.0])
    want = teacher.gate(h)
    s = torch.tensor(theta) / (0.25 + 0.025)
    fitted = (h > torch.tensor(theta)) | (h < 0.8 * torch.tensor(theta))  # off the unfitted band below theta
    err_tail = ((tailed.gate_raw(h) - want).abs() / s)[fitted].max()
    err_plain = ((plain.gate_raw(h) - want).abs() / s)[fitted].max()
    on = (want != 0) & (h > 1.2 * torch.tensor(theta))
    assert ((tailed.gate(h) != 0) == (want != 0))[on].all()
    assert err_tail <= fit.max_error * 1.01 + 1e-6
    assert err_plain > 100 * err_tail


def test_linear_input_grad_changes_only_the_pre_activation_gradient():
    """``rational_l0_loss(linear_input_grad=True)``: the same loss and parts, the same gradients to the gate's
    parameters (a, b, C_in, C_out, s) and to W_dec / b_dec, and a gradient to the pre-activations of exactly
    C_out / C_in times dL/dz on the support (zero elsewhere), where the exact one follows the rational's slope."""
    _, rsae, _ = _upgrade((0.5, 1.0, 2.0, 0.3), tail=True)
    with torch.no_grad():
        rsae.gate_fn.log_c_out.fill_(0.2)  # C_out / C_in != 1
    x = torch.randn(2048, 8, generator=torch.Generator().manual_seed(5)) * 2
    seen: dict[str, torch.Tensor] = {}

    def run(linear: bool):
        rsae.zero_grad(set_to_none=True)
        h0 = rsae.pre_acts
        rsae.pre_acts = lambda v: seen.setdefault(str(linear), h0(v).detach().requires_grad_(True))  # type: ignore[method-assign]
        try:
            loss, parts = rational_l0_loss(linear_input_grad=linear)(rsae, x, 2.0)
            loss.backward()
        finally:
            del rsae.pre_acts
        return loss.item(), parts, {n: p.grad.clone() for n, p in rsae.named_parameters() if p.grad is not None}

    le, pe, ge = run(False)
    ll, pl, gl = run(True)
    assert ll == le and pl == pe
    for n in ("gate_fn.a", "gate_fn.b", "gate_fn.log_c_in", "gate_fn.log_c_out", "gate_fn.log_scale", "W_dec", "b_dec"):
        torch.testing.assert_close(gl[n], ge[n], msg=n)
    h = seen["True"]
    z = rsae.gate(h.detach()).detach().requires_grad_(True)
    mse = (x - rsae.decode(z)).pow(2).sum(-1).mean()
    (gz,) = torch.autograd.grad(mse, z)
    slope = (rsae.gate_fn.c_out / rsae.gate_fn.c_in).item()
    torch.testing.assert_close(h.grad, gz * slope * (z != 0))
    assert not torch.allclose(seen["False"].grad, h.grad)  # the rational's own slope differs in the band


def test_scales_only_l0_gradient_reaches_the_per_latent_scales_alone():
    """``rational_l0_loss(scales_only=True)``: the same loss; the L0 term's gradient (lam = 5 minus lam = 0)
    reaches log_scale as the full penalty's does, and not a, b or C_in."""
    _, rsae, _ = _upgrade((0.5, 1.0, 2.0, 0.3), tail=True)
    x = torch.randn(4096, 8, generator=torch.Generator().manual_seed(3)) * 2

    def grads(lam, scales_only):
        rsae.zero_grad(set_to_none=True)
        loss, _ = rational_l0_loss(scales_only=scales_only)(rsae, x, lam)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in rsae.named_parameters() if p.grad is not None}

    l_full, g_full = grads(5.0, False)
    l_sc, g_sc = grads(5.0, True)
    _, g0 = grads(0.0, True)
    assert l_sc == l_full
    torch.testing.assert_close(g_sc["gate_fn.log_scale"], g_full["gate_fn.log_scale"])
    assert not torch.allclose(g_sc["gate_fn.log_scale"], g0["gate_fn.log_scale"])
    for n in ("gate_fn.a", "gate_fn.b", "gate_fn.log_c_in"):
        torch.testing.assert_close(g_sc[n], g0[n], msg=n)  # the L0 term adds nothing there
        assert not torch.allclose(g_full[n], g0[n]), n  # where the full penalty's does


def test_scales_as_thresholds_learn_only_through_the_support_estimator():
    """``rational_l0_loss(scales_as_thresholds=True)``: the same loss and L0 as the gate's own forward; the same
    gradients as ``scales_only`` to every parameter but the scales; a scale gets gradient only from entries
    inside the straight-through kernel around the floor (exactly 0 for a latent with none there), where the
    value path would give every kept entry's share."""
    _, rsae, _ = _upgrade((0.5, 1.0, 2.0, 0.3), tail=True)
    x = torch.randn(4096, 8, generator=torch.Generator().manual_seed(7)) * 2

    def grads(lam, **kw):
        rsae.zero_grad(set_to_none=True)
        loss, parts = rational_l0_loss(**kw)(rsae, x, lam)
        loss.backward()
        return loss.item(), parts, {n: p.grad.clone() for n, p in rsae.named_parameters() if p.grad is not None}

    l_sc, p_sc, g_sc = grads(0.0, scales_only=True)
    l_th, p_th, g_th = grads(0.0, scales_as_thresholds=True)
    assert l_th == pytest.approx(l_sc, rel=1e-5) and p_th["l0"] == p_sc["l0"]
    for n, g in g_sc.items():
        if n != "gate_fn.log_scale":
            torch.testing.assert_close(g_th[n], g, msg=n)
    assert not torch.allclose(g_th["gate_fn.log_scale"], g_sc["gate_fn.log_scale"])
    # the expected scale gradient: sum_i dMSE/dz_ij * v_ij * K(u_ij - floor) / floor * du_ij/dlog s_j
    g, floor = rsae.gate_fn, rsae.floor
    with torch.no_grad():
        h = rsae.pre_acts(x)
        v = g.raw(h)
    z = rsae.gate(h).detach().requires_grad_(True)
    (gz,) = torch.autograd.grad((x - rsae.decode(z)).pow(2).sum(-1).mean(), z)
    u = g.unit(h)
    kernel = ((u.detach() - floor).abs() < floor / 2).to(u.dtype) / floor
    (expected,) = torch.autograd.grad((gz * v * kernel * u).sum(), g.log_scale)
    torch.testing.assert_close(g_th["gate_fn.log_scale"], expected)
    _, _, g_l0 = grads(5.0, scales_as_thresholds=True)
    assert not torch.allclose(g_l0["gate_fn.log_scale"], g_th["gate_fn.log_scale"])  # the L0 term reaches them

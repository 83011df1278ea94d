"""SAE families (ReLU, JumpReLU, TopK): gates, straight-through gradients, SAELens-layout round trips,
validation, and the per-latent scales of the rational gate that reproduce a JumpReLU exactly."""

import json

import pytest
import torch

from rsae.errors import TeacherError
from rsae.remez import remez_fit
from rsae.saes import JumpReLUSAE, RationalSAE, TopKSAE, load_sae


def _fill(sae, seed=0):
    g = torch.Generator().manual_seed(seed)
    sae.init_weights(g)
    with torch.no_grad():
        sae.b_enc.normal_(generator=g)
    return sae


def test_jumprelu_gate_and_straight_through_gradient():
    sae = _fill(JumpReLUSAE(8, 5, bandwidth=0.2))
    with torch.no_grad():
        sae.log_threshold.copy_(torch.tensor([0.5, 1.0, 1.5, 2.0, 0.1]).log())
    h = torch.tensor([[0.45, 1.05, 1.0, 3.0, -1.0]], requires_grad=True)
    z = sae.gate(h)
    assert torch.equal(z.detach(), torch.tensor([[0.0, 1.05, 0.0, 3.0, 0.0]]))  # h > theta strictly
    z.sum().backward()
    assert torch.equal(h.grad, torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0]]))  # dz/dh = H(h - theta)
    # d z / d theta = -(theta / eps) K((h - theta) / eps): non-zero only within eps/2 of theta
    g = sae.log_threshold.grad / sae.threshold  # chain rule through log
    expected = torch.tensor([-(0.5 / 0.2), -(1.0 / 0.2), -(1.5 / 0.2) * 0, 0.0, 0.0])
    expected[2] = 0.0  # |1.0 - 1.5| > 0.1
    torch.testing.assert_close(g.detach(), expected)


def test_jumprelu_l0_step_gradient():
    sae = _fill(JumpReLUSAE(4, 3, bandwidth=1.0))
    h = torch.tensor([[0.9, 3.0, 1.2]])  # theta = 1 for all
    l0 = sae.step(h).sum()
    assert l0.item() == 2.0
    l0.backward()
    torch.testing.assert_close(sae.log_threshold.grad, torch.tensor([-1.0, 0.0, -1.0]))


def test_topk_gate_keeps_k_largest_then_relu():
    sae = _fill(TopKSAE(4, 6, k=2))
    h = torch.tensor([[3.0, -1.0, 2.0, 0.5, 1.0, -2.0], [-3.0, -1.0, -2.0, -0.5, -1.5, -2.0]])
    z = sae.gate(h)
    assert torch.equal(z, torch.tensor([[3.0, 0, 2.0, 0, 0, 0], [0, 0, 0, 0, 0, 0.0]]))


@pytest.mark.parametrize("make", [lambda: JumpReLUSAE(16, 32, bandwidth=0.3), lambda: TopKSAE(16, 32, k=4)])
def test_roundtrip_saelens_layout(tmp_path, make):
    sae = _fill(make())
    if isinstance(sae, JumpReLUSAE):
        with torch.no_grad():
            sae.log_threshold.uniform_(-1, 0.5)
    sae.save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == sae.architecture
    loaded = load_sae(tmp_path)
    assert type(loaded) is type(sae)
    x = torch.randn(10, 16)
    torch.testing.assert_close(loaded(x), sae(x))
    if isinstance(sae, TopKSAE):
        assert cfg["k"] == 4 and ((loaded.encode(x) != 0).sum(-1) <= 4).all()


def test_family_specific_validation(tmp_path):
    _fill(TopKSAE(8, 16, k=3)).save(tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "cfg.json").read_text())
    cfg["k"] = 99
    (tmp_path / "t" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(TeacherError) as e:
        load_sae(tmp_path / "t")
    assert e.value.field == "cfg.json.k"
    from safetensors.torch import load_file, save_file

    sae = _fill(JumpReLUSAE(8, 16))
    sae.save(tmp_path / "j")
    d = load_file(str(tmp_path / "j" / "sae_weights.safetensors"))
    d["threshold"] = -d["threshold"]
    save_file(d, str(tmp_path / "j" / "sae_weights.safetensors"))
    with pytest.raises(TeacherError) as e:
        load_sae(tmp_path / "j")
    assert e.value.field == "sae_weights.safetensors.threshold"


def _jump_fit_and_teacher(c, margin, theta=(0.5, 2.0, 8.0)):
    """(9, 8) JumpReLU Remez fit at (c, margin), and a JumpReLU teacher 8 -> 3 with thresholds ``theta``."""
    fit = remez_fit("jumprelu", c=c, p=9, q=8, margin=margin)
    teacher = _fill(JumpReLUSAE(8, len(theta)))
    theta = torch.tensor(theta)
    with torch.no_grad():
        teacher.log_threshold.copy_(theta.log())
    return fit, teacher, theta


def test_per_latent_scales_put_every_jump_at_its_own_threshold():
    """s_j = theta_j / c makes s_j * g(h / s_j) = h * H(h - theta_j): a rational fitted to g(t) = t H(t - c)
    reproduces a JumpReLU teacher latent by latent, up to the fit's error and the margin around the jump."""
    c, margin = 0.25, 0.05
    fit, teacher, theta = _jump_fit_and_teacher(c, margin)
    rsae = RationalSAE.from_teacher(teacher, a=fit.a, b=fit.b, c_in=1.0, c_out=1.0, scale=theta / c, floor=c / 2)
    assert rsae.gate_fn.train_scale and rsae.gate_fn.log_scale.requires_grad
    u = torch.linspace(-1.0, 1.0, 2001)  # t-units: h_j = u * theta_j / c
    h = u[:, None] * (theta / c)[None, :]
    outside = ((u - c).abs() >= margin)[:, None].expand_as(h)
    diff = (rsae.gate_raw(h) - teacher.gate(h)).abs() / (theta / c)  # error in t-units
    assert diff[outside].max() <= fit.max_error * 1.01
    z = rsae.gate(h)
    assert torch.equal((z != 0)[outside], (teacher.gate(h) != 0)[outside])  # exact zeros off the jump


def _topk_rsae(k, cap, d_in=8, d_sae=24, c=0.25, margin=0.025):
    fit = remez_fit("topk", c=c, p=9, q=8, margin=margin)
    teacher = _fill(TopKSAE(d_in, d_sae, k=k))
    rsae = RationalSAE.from_teacher(
        teacher, a=fit.a, b=fit.b, c_in=1.0, c_out=1.0, rational={"jump": c, "topk_k": k, "topk_cap": cap}
    )
    return teacher, rsae


def test_topk_cap_keeps_l0_at_most_k_and_only_the_teachers_entries():
    """With ``topk_cap`` the RSAE can only activate each token's k largest pre-activations: L0 <= k exactly,
    even with a floor of 0 (which lets every entry with r > 0 through, including those in the margin band
    below the token's separating threshold)."""
    k = 4
    teacher, capped = _topk_rsae(k, cap=True)
    _, free = _topk_rsae(k, cap=False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 8, generator=g) * 3
    for sae in (capped, free):
        sae.set_floor(-1.0)  # below every r: selection left to the cap alone
    z_cap, z_free, z_t = capped.encode(x), free.encode(x), teacher.encode(x)
    assert (z_free != 0).sum(-1).float().mean() > k  # without the cap the floor lets more through
    assert ((z_cap != 0).sum(-1) <= k).all()
    assert not ((z_cap != 0) & (z_t == 0)).any()  # never an entry the teacher keeps inactive
    # the capped values are the rational's values on the kept entries
    keep = z_cap != 0
    torch.testing.assert_close(z_cap[keep], z_free[keep])


def test_topk_cap_passes_gradients_to_kept_entries_only_and_roundtrips(tmp_path):
    teacher, rsae = _topk_rsae(3, cap=True)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(2)) * 3
    h = rsae.pre_acts(x).detach().requires_grad_(True)
    z = rsae.gate(h)
    z.sum().backward()
    assert torch.all(h.grad[z == 0] == 0)
    rsae.save(tmp_path / "r")
    back = load_sae(tmp_path / "r")
    assert back.rational_cfg["topk_cap"] is True
    torch.testing.assert_close(back.encode(x), rsae.encode(x))


def test_jumprelu_control_uses_its_own_l0_penalty_and_topk_cap_drops_l1():
    """The compute-matched control of a JumpReLU teacher trains with MSE + mu * L0 (straight-through), mu from
    the teacher's l0_coefficient; capped TopK fine-tuning uses lambda = 0 and no L0 target."""
    from rsae.config import UpgradeConfig
    from rsae.pipeline.finetune import finetune_sparsity
    from rsae.saes import get_family, jumprelu_l0_loss

    jumprelu, topk = get_family("jumprelu"), get_family("topk")
    jt = _fill(JumpReLUSAE(8, 16))
    jt.metadata["l0_coefficient"] = 5.0
    ctrl = jumprelu.control_objective(jt, 0.3, "auto")
    assert ctrl.loss_fn is jumprelu_l0_loss and ctrl.coefficient == 5.0
    rt = _fill(TopKSAE(8, 16, k=4))
    assert topk.control_objective(rt, 0.0, "x").loss_fn is None
    cfg = UpgradeConfig(layer=3, teacher="t")
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(3))
    assert finetune_sparsity(cfg, topk, rt, x, 4.0, rank_capped=True)[0] == 0.0
    assert finetune_sparsity(cfg, topk, rt, x, 4.0, rank_capped=True)[2] is None
    lam, src, target = finetune_sparsity(cfg, jumprelu, jt, x, 10.0, rank_capped=False)
    assert lam > 0 and src.startswith("auto") and target == pytest.approx(9.5)


def test_topk_gate_stays_finite_on_tokens_with_few_positive_pre_activations():
    """A token whose (k+1)-th pre-activation is <= 0 (seen on SmolLM2's ~900-norm outlier tokens) has a
    midpoint threshold <= 0; the gate's per-token scale then used to collapse to ~1e-6 / c and P(t) overflowed
    to inf. The threshold is now at least 1e-3 of the token's largest pre-activation: outputs stay finite and
    the token's clearly positive entries stay active."""
    from rsae.saes.topk import TAU_MIN_RATIO, topk_separating_threshold

    k = 4
    teacher, rsae = _topk_rsae(k, cap=True)
    h = torch.full((2, teacher.d_sae), -5.0)
    h[0, :2] = torch.tensor([900.0, 3.0])  # only two positive pre-activations, k = 4
    h[1, :6] = torch.tensor([8.0, 7.0, 6.0, 5.0, 4.0, 3.0])  # an ordinary token
    tau = topk_separating_threshold(h, k)
    assert tau[0, 0] == pytest.approx(TAU_MIN_RATIO * 900.0) and tau[1, 0] == pytest.approx(4.5)
    with torch.no_grad():
        z = rsae.gate(h)
    assert torch.isfinite(z).all()
    assert z[0, 0] > 0 and z[0, 1] > 0 and (z[0, 2:] == 0).all()


def test_upper_edge_anchor_puts_every_kept_entry_in_the_fitted_set():
    """With the default 'upper_edge' placement, s_j = theta_j / (c + delta): every entry a JumpReLU teacher
    keeps (theta_j < h <= s_j) has t in [c + delta, 1], the fitted set, so the RSAE's value is within the fit's
    max error (x s_j) of h; the band (c - delta, c + delta) maps below theta_j, where the teacher is 0. With
    the 'center' placement (s_j = theta_j / c) the smallest kept entries fall in the band and get
    transitional values, up to ~half the jump."""
    from rsae.pipeline.initialize import jump_anchor

    c, margin = 0.25, 0.025
    fit, teacher, theta = _jump_fit_and_teacher(c, margin)
    errs = {}
    for placement in ("upper_edge", "center"):
        a = jump_anchor(c, margin, placement)
        rsae = RationalSAE.from_teacher(
            teacher, a=fit.a, b=fit.b, c_in=1.0, c_out=1.0, scale=theta / a, rational={"jump": c, "anchor": a}
        )
        h = torch.linspace(0.0, 1.0, 4001)[:, None] * (theta / a)[None, :]  # t in [0, 1]
        kept = teacher.gate(h) != 0
        err = (rsae.gate_raw(h) - h).abs() / (theta / a)  # t-units
        errs[placement] = err[kept].max().item()
    assert jump_anchor(c, margin, "upper_edge") == pytest.approx(0.275)
    assert errs["upper_edge"] <= fit.max_error * 1.01
    assert errs["center"] > 10 * fit.max_error
    with pytest.raises(ValueError):
        jump_anchor(c, margin, "lower_edge")


def test_topk_anchor_gives_the_kth_entry_its_own_value():
    """Per-token TopK with the anchor at c + delta: the token's k-th largest pre-activation (just above its
    separating threshold tau_i) is reproduced within the fit's error, where the centre placement (anchor c)
    under-estimates it (it lies in the band)."""
    k, c, margin = 4, 0.25, 0.025
    fit = remez_fit("topk", c=c, p=9, q=8, margin=margin)
    teacher = _fill(TopKSAE(8, 24, k=k))
    h = torch.full((1, 24), -1.0)
    h[0, :6] = torch.tensor([10.0, 9.0, 8.0, 5.1, 4.9, 1.0])  # tau = 5.0, k-th = 5.1
    rel = {}
    for a in (c + margin, c):
        rsae = RationalSAE.from_teacher(
            teacher,
            a=fit.a,
            b=fit.b,
            c_in=1.0,
            c_out=1.0,
            rational={"jump": c, "anchor": a, "topk_k": k, "topk_cap": True},
        )
        with torch.no_grad():
            z = rsae.gate(h)
        assert ((z != 0).sum(-1) <= k).all()
        rel[a] = abs(z[0, 3].item() - 5.1) / (5.0 / a)  # t-units
    assert rel[c + margin] <= fit.max_error * 1.01
    assert rel[c] > 10 * fit.max_error

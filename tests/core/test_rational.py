"""Rational gate, RSAE save/load round trip, SAE file validation."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import rsae
from rsae.errors import TeacherError
from rsae.kernels import horner
from rsae.remez import remez_fit
from rsae.saes import RationalGate, RationalSAE, ReLUSAE, load_sae


def test_horner_matches_powers():
    c = torch.tensor([0.5, -1.0, 2.0, 0.25])
    t = torch.linspace(-3, 3, 101)
    ref = sum(c[k] * t**k for k in range(4))
    torch.testing.assert_close(horner(c, t), ref)


def test_gate_formula_and_exact_zeros():
    g = RationalGate(2, 2, a=[0.1, 1.0, 0.5], b=[0.0, 2.0], c_in=2.0, c_out=3.0, floor=0.05)
    h = torch.linspace(-4, 4, 81)
    t = h / 2.0
    expected = 3.0 * (0.1 + t + 0.5 * t**2) / (1 + (2.0 * t**2).abs())
    torch.testing.assert_close(g.raw(h), expected)
    z = g(h)  # the floor is in r-units: active iff r(t) = expected / C_out > 0.05
    assert torch.equal(z != 0, expected / 3.0 > 0.05)
    torch.testing.assert_close(z[z != 0], expected[z != 0])


def test_gate_has_no_poles():
    g = RationalGate(3, 2, a=[0.0, 1.0, 0.0, 1.0], b=[-5.0, -5.0])  # B changes sign: |B| keeps Q >= 1
    h = torch.linspace(-100, 100, 200001)
    assert torch.isfinite(g.raw(h)).all()


def test_remez_initialised_gate_approximates_relu():
    fit = remez_fit("relu", p=3, q=2)
    g = RationalGate(3, 2, a=fit.a, b=fit.b, c_in=5.0, c_out=5.0, floor=fit.max_error_float32)
    h = torch.linspace(-5, 5, 1001)
    assert (g.raw(h) - torch.relu(h)).abs().max() <= 5.0 * fit.max_error * 1.001
    assert torch.all(g(h)[h <= 0] == 0)


def _teacher(d_in=16, d_sae=32, seed=0):
    torch.manual_seed(seed)
    t = ReLUSAE(d_in, d_sae, metadata={"l1_coefficient": 1.0})
    t.init_weights()
    with torch.no_grad():
        t.b_enc.normal_()
        t.b_dec.normal_()
    return t


def test_rsae_roundtrip(tmp_path):
    fit = remez_fit("relu", p=3, q=2)
    teacher = _teacher()
    sae = RationalSAE.from_teacher(teacher, a=fit.a, b=fit.b, c_in=2.0, c_out=1.5, floor=0.01)
    for n in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(sae, n), getattr(teacher, n))  # copied exactly
    sae.save(tmp_path / "r")
    cfg = json.loads((tmp_path / "r" / "cfg.json").read_text())
    assert cfg["architecture"] == "rational" and cfg["rational"]["p"] == 3
    loaded = rsae.load(tmp_path / "r")
    assert isinstance(loaded, RationalSAE)
    x = torch.randn(64, 16)
    torch.testing.assert_close(loaded.forward(x), sae.forward(x))
    torch.testing.assert_close(loaded.encode(x), sae.encode(x))
    assert loaded.decode(loaded.encode(x)).shape == (64, 16)


def test_relu_teacher_roundtrip(tmp_path):
    teacher = _teacher()
    teacher.save(tmp_path / "t")
    loaded = load_sae(tmp_path / "t")
    assert type(loaded) is ReLUSAE and loaded.metadata == {"l1_coefficient": 1.0}
    x = torch.randn(8, 16)
    torch.testing.assert_close(loaded(x), teacher(x))
    # the SAELens convention: encode subtracts b_dec first
    torch.testing.assert_close(loaded.encode(x), torch.relu((x - teacher.b_dec) @ teacher.W_enc + teacher.b_enc))


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d.__setitem__("W_enc", d["W_enc"].T.contiguous()), "sae_weights.safetensors.W_enc"),
        (lambda d: d.__setitem__("b_dec", torch.full_like(d["b_dec"], float("nan"))), "sae_weights.safetensors.b_dec"),
        (lambda d: d.pop("W_dec"), "sae_weights.safetensors.W_dec"),
        (lambda d: d.__setitem__("b_enc", d["b_enc"].to(torch.int32)), "sae_weights.safetensors.b_enc"),
    ],
)
def test_bad_weights_are_rejected_with_field(tmp_path, mutate, field):
    _teacher().save(tmp_path)
    d = load_file(str(tmp_path / "sae_weights.safetensors"))
    mutate(d)
    save_file(d, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(TeacherError) as e:
        load_sae(tmp_path)
    assert e.value.field == field


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda c: c.__setitem__("d_in", "16"), "cfg.json.d_in"),
        (lambda c: c.__setitem__("architecture", "gated-mystery"), "cfg.json.architecture"),
        (lambda c: c.pop("d_sae"), "cfg.json.d_sae"),
        (lambda c: c.__setitem__("d_sae", 10**12), "cfg.json.d_sae"),
    ],
)
def test_bad_cfg_is_rejected_with_field(tmp_path, edit, field):
    _teacher().save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    edit(cfg)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(TeacherError) as e:
        load_sae(tmp_path)
    assert e.value.field == field


def test_corrupt_files(tmp_path):
    _teacher().save(tmp_path)
    raw = (tmp_path / "sae_weights.safetensors").read_bytes()
    (tmp_path / "sae_weights.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(TeacherError, match="safetensors"):
        load_sae(tmp_path)
    (tmp_path / "cfg.json").write_text("{not json")
    with pytest.raises(TeacherError) as e:
        load_sae(tmp_path)
    assert e.value.field == "cfg.json"


def test_calibrate_gate_fits_the_scalars_only_and_restores_requires_grad():
    """calibrate_gate lowers the l2 gate error, leaves the SAE weights and per-latent scales untouched, and
    hands them back still trainable (they are frozen only during its loop)."""
    from rsae.pipeline.calibrate import calibrate_gate

    fit = remez_fit("relu", p=5, q=4)
    teacher = _teacher(d_in=16, d_sae=64)
    rsae_ = RationalSAE.from_teacher(teacher, a=fit.a, b=fit.b, c_in=2.0, c_out=2.0, scale=torch.full((64,), 1.5))
    h = torch.randn(512, 64, generator=torch.Generator().manual_seed(0)) * 3
    target = torch.relu(h)
    w_before = rsae_.W_enc.detach().clone()
    s_before = rsae_.gate_fn.scale.detach().clone()
    with torch.no_grad():
        before = (rsae_.gate_raw(h) - target).pow(2).mean().item()
    losses = calibrate_gate(rsae_, h, target, steps=60, lr=1e-2, sample=4096)
    with torch.no_grad():
        after = (rsae_.gate_raw(h) - target).pow(2).mean().item()
    assert len(losses) == 60 and after < 0.5 * before
    assert torch.equal(rsae_.W_enc, w_before) and torch.equal(rsae_.gate_fn.scale, s_before)
    assert all(p.requires_grad for p in rsae_.parameters())


def test_selected_calibration_fits_the_kept_entries_better_than_the_all_entries_objective():
    """objective 'selected' (capped TopK): entries outside the selection count as exact zeros, so the scalars
    fit the kept values only; on those entries its error ends below the 'all' objective's, while the 'all'
    objective spends its fit on the (far more numerous) zeroed entries."""
    from rsae.pipeline.calibrate import calibrate_gate, calibration_loss

    fit = remez_fit("topk", c=0.25, p=9, q=8, margin=0.025)
    teacher = _teacher(d_in=16, d_sae=64)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(512, 64, generator=g).abs() * 0.5  # unit-scale pre-activations in [0, ~1.5]
    kept = h > 0.275  # a teacher that keeps h above its jump (anchor c + delta)
    target = torch.where(kept, h, torch.zeros(()))
    errs = {}
    for objective in ("all", "selected"):
        rsae_ = RationalSAE.from_teacher(teacher, a=fit.a, b=fit.b, c_in=1.0, c_out=1.0)
        sel = kept if objective == "selected" else None
        with torch.no_grad():
            raw = rsae_.gate_raw(h)
            manual = (
                (torch.where(kept, raw, torch.zeros(())) - target).pow(2).mean()
                if sel is not None
                else (raw - target).pow(2).mean()
            )
            assert calibration_loss(rsae_, h, target, sel).item() == pytest.approx(manual.item())
        calibrate_gate(rsae_, h, target, steps=150, lr=1e-2, sample=8192, selected=sel)
        with torch.no_grad():
            errs[objective] = (rsae_.gate_raw(h) - target)[kept].pow(2).mean().item()
    assert errs["selected"] < errs["all"]

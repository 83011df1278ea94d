"""Latent identity statistics (:mod:`rsae.identity`) on small synthetic SAEs whose answers are known: an identical
copy, latents killed or created, a rescaled and a sign-flipped latent; streaming sums against a dense reference;
the artifact round trip and the report section."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from rsae.identity import (
    IDENTITY_FILE,
    PearsonSums,
    batch_rows,
    distribution,
    evaluate_identity,
    identity_section,
    latent_identity,
    load_identity,
    save_identity,
)
from rsae.report import LatentIdentitySection
from rsae.saes import ReLUSAE

D_IN, D_SAE, ROWS = 24, 40, 600


def _teacher(seed: int = 0) -> ReLUSAE:
    sae = ReLUSAE(D_IN, D_SAE)
    sae.init_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():  # biases so that latents fire on part of the tokens, not on half of them
        sae.b_enc.copy_(-0.05 + 0.04 * torch.rand(D_SAE, generator=torch.Generator().manual_seed(seed + 1)))
    return sae


def _x(rows: int = ROWS, seed: int = 2) -> torch.Tensor:
    return torch.randn(rows, D_IN, generator=torch.Generator().manual_seed(seed))


def _batches(x: torch.Tensor, size: int):
    """A one-shot generator: the statistics must come from a single streaming pass."""
    return (x[i : i + size] for i in range(0, x.shape[0], size))


def test_an_identical_sae_keeps_every_latent():
    teacher = _teacher()
    ident = latent_identity(teacher, {"rsae": copy.deepcopy(teacher)}, _batches(_x(), 64))
    assert ident.n_tokens == ROWS
    torch.testing.assert_close(ident.decoder_cos["rsae"], torch.ones(D_SAE, dtype=torch.float64))
    fired = ident.counts["teacher"] > 0
    assert fired.sum() > D_SAE // 2 and (ident.counts["teacher"] < ROWS).all()  # the test is not trivial
    torch.testing.assert_close(ident.activation_corr["rsae"][fired], torch.ones(int(fired.sum()), dtype=torch.float64))
    assert torch.equal(ident.counts["rsae"], ident.counts["teacher"])
    assert (ident.ratio("rsae")[fired] == 1).all()
    assert not ident.died("rsae").any() and not ident.born("rsae").any()
    s = identity_section(ident)
    change = s.vs_teacher["rsae"]
    assert change.died == change.born == 0 and change.died_latents == change.born_latents == []
    assert change.decoder_cos.min == pytest.approx(1.0) and change.activation_corr.min == pytest.approx(1.0)
    assert change.share_rate_within_2x == 1.0 and change.share_corr_at_least_0_9 == 1.0
    assert change.firing_rate_ratio.median == 1.0 and change.firing_rate_ratio.n == int(fired.sum())


def test_zeroed_latents_die_and_silent_ones_are_born():
    teacher = _teacher()
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        other.W_enc[:, 3] = 0.0  # latent 3: pre-activation = b_enc < 0: never fires
        other.W_dec[3] = 0.0
        other.W_enc[:, 7] = 0.0
        teacher.b_enc[11] = -1e3  # latent 11: silent in the teacher, firing in the other SAE
        other.b_enc[11] = 0.5
    ident = latent_identity(teacher, {"rsae": other}, _batches(_x(), 50))
    assert torch.nonzero(ident.died("rsae")).flatten().tolist() == [3, 7]
    assert torch.nonzero(ident.born("rsae")).flatten().tolist() == [11]
    assert math.isnan(ident.decoder_cos["rsae"][3])  # zero decoder row: undefined, not 0 or 1
    for j in (3, 7, 11):
        assert math.isnan(ident.activation_corr["rsae"][j])  # one side constant
    assert ident.ratio("rsae")[3] == 0 and math.isinf(ident.ratio("rsae")[11])
    change = identity_section(ident).vs_teacher["rsae"]
    assert (change.died, change.born, change.corr_undefined) == (2, 1, 3)
    t = ident.counts["teacher"]
    assert change.died_latents == sorted([3, 7], key=lambda j: (-int(t[j]), j))  # teacher's most frequent first
    assert change.born_latents == [11]
    assert change.decoder_cos.n == D_SAE - 1
    assert change.firing_rate_ratio.min == 0.0


def test_rescaled_latent_keeps_its_identity_and_a_flipped_one_does_not():
    """A latent whose encoder and decoder are scaled (same direction, same tokens) keeps cosine 1, correlation 1,
    ratio 1; a decoder row negated gives cosine -1 though it fires as before."""
    teacher = _teacher()
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        other.W_enc[:, 5] *= 3.0
        other.b_enc[5] *= 3.0
        other.W_dec[5] *= 0.25
        other.W_dec[6] *= -1.0
    ident = latent_identity(teacher, {"rsae": other}, _batches(_x(), 128))
    assert ident.decoder_cos["rsae"][5].item() == pytest.approx(1.0)
    assert ident.activation_corr["rsae"][5].item() == pytest.approx(1.0)
    assert ident.ratio("rsae")[5] == 1.0
    assert ident.decoder_cos["rsae"][6].item() == pytest.approx(-1.0)
    assert ident.activation_corr["rsae"][6].item() == pytest.approx(1.0)


@pytest.mark.parametrize("size", [1, 7, 64, ROWS])
def test_streaming_correlation_equals_the_dense_one(size: int):
    teacher, other = _teacher(0), _teacher(0)
    with torch.no_grad():
        other.W_enc.add_(0.03 * torch.randn(D_IN, D_SAE, generator=torch.Generator().manual_seed(9)))
    x = _x()
    ident = latent_identity(teacher, {"rsae": other}, _batches(x, size))
    with torch.no_grad():  # the same float32 encodings as the streamed batches'
        zt = torch.cat([teacher.encode(b) for b in _batches(x, size)]).double()
        zo = torch.cat([other.encode(b) for b in _batches(x, size)]).double()
    for j in range(D_SAE):
        a, b = zt[:, j], zo[:, j]
        if a.std() == 0 or b.std() == 0:
            assert math.isnan(ident.activation_corr["rsae"][j])
        else:
            ref = torch.corrcoef(torch.stack([a, b]))[0, 1]
            assert ident.activation_corr["rsae"][j].item() == pytest.approx(ref.item(), abs=1e-10)
    assert torch.equal(ident.counts["rsae"], (zo != 0).sum(0))
    ref_cos = torch.nn.functional.cosine_similarity(teacher.W_dec.double(), other.W_dec.double(), dim=1)
    torch.testing.assert_close(ident.decoder_cos["rsae"], ref_cos.detach())


def test_pearson_sums_with_an_offset_column():
    """A large constant offset (mean >> spread) does not cancel the co-moments away (the merged centred sums)."""
    g = torch.Generator().manual_seed(0)
    a = 1e6 + torch.randn(1000, 1, dtype=torch.float64, generator=g)
    b = 2 * a + 0.1 * torch.randn(1000, 1, dtype=torch.float64, generator=g)
    s = PearsonSums(1)
    for i in range(0, 1000, 33):
        s.update(a[i : i + 33], b[i : i + 33])
    ref = torch.corrcoef(torch.cat([a, b], 1).T)[0, 1]
    assert s.corr()[0].item() == pytest.approx(ref.item(), abs=1e-9)


def test_artifact_round_trip_and_section(tmp_path: Path):
    teacher = _teacher()
    rsae, control = copy.deepcopy(teacher), copy.deepcopy(teacher)
    with torch.no_grad():
        rsae.W_dec.add_(0.02 * torch.randn(D_SAE, D_IN, generator=torch.Generator().manual_seed(4)))
        control.b_enc.sub_(0.05)

    class Rows:  # the ActivationStore interface evaluate_identity reads
        def iter_ordered(self, batch_size: int):
            return _batches(_x(), batch_size)

    section = evaluate_identity(teacher, {"rsae": rsae, "control": control, "missing": None}, Rows(), tmp_path)
    ident = load_identity(tmp_path / IDENTITY_FILE)
    assert ident.others == ["rsae", "control"] and ident.n_tokens == ROWS
    assert section == identity_section(ident)
    again = load_identity(save_identity(ident, tmp_path / "again.safetensors"))
    for k in ("teacher", "rsae", "control"):
        assert torch.equal(again.counts[k], ident.counts[k])
    torch.testing.assert_close(again.activation_corr["rsae"], ident.activation_corr["rsae"], equal_nan=True)
    assert LatentIdentitySection.model_validate(section.model_dump(mode="json")) == section
    assert set(section.firing_rate) == set(section.dead) == set(section.density_hist) == {"teacher", "rsae", "control"}
    assert set(section.vs_teacher) == set(section.decoder_cos_hist) == {"rsae", "control"}
    for h in (*section.decoder_cos_hist.values(), *section.activation_corr_hist.values()):
        assert len(h.edges) == len(h.counts) + 1 and h.edges[-1] == 1.0
    assert sum(section.decoder_cos_hist["rsae"].counts) == D_SAE
    for k in ("teacher", "rsae", "control"):
        assert sum(section.density_hist[k].counts) == D_SAE - section.dead[k]
        assert section.density_hist[k].edges[0] == math.floor(math.log10(1 / ROWS))
    # control: higher thresholds, same directions: fewer tokens, cos 1
    assert section.vs_teacher["control"].decoder_cos.min == pytest.approx(1.0)
    assert section.vs_teacher["control"].firing_rate_ratio.max <= 1.0
    assert section.firing_rate["control"].mean < section.firing_rate["teacher"].mean
    assert section.scatter.latents == list(range(D_SAE)) and not section.scatter.sampled
    assert section.scatter.teacher == ident.counts["teacher"].tolist()
    small = identity_section(ident, scatter_max=10)
    assert small.scatter.sampled and len(small.scatter.latents) == 10
    assert small.scatter.latents == sorted(small.scatter.latents)
    assert small.scatter.rsae == ident.counts["rsae"][small.scatter.latents].tolist()


def test_distribution_and_bad_inputs(tmp_path: Path):
    d = distribution(torch.tensor([float("nan"), 1.0, 2.0, 3.0, 4.0, 5.0, float("inf")]))
    assert (d.n, d.min, d.median, d.max, d.mean) == (5, 1.0, 3.0, 5.0, 3.0)
    assert distribution(torch.tensor([float("nan")])).median is None
    assert 16 <= batch_rows(1 << 20) <= batch_rows(2304) <= 2048
    teacher = _teacher()
    with pytest.raises(ValueError, match="no held-out rows"):
        latent_identity(teacher, {"rsae": teacher}, iter([]))
    with pytest.raises(ValueError, match="shapes differ"):
        latent_identity(teacher, {"rsae": ReLUSAE(D_IN, D_SAE + 1)}, _batches(_x(), 10))
    with pytest.raises(ValueError, match="teacher"):
        latent_identity(teacher, {"teacher": teacher}, _batches(_x(), 10))
    (tmp_path / "w.safetensors").write_bytes(b"")
    with pytest.raises(Exception):
        load_identity(tmp_path / "w.safetensors")

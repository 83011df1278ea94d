"""RSAEs out: an upgraded SAE folder loads with ``rsae`` (``RationalSAE.load``) and with SAELens's own
``SAE.load_from_disk`` through the ``"rational"`` architecture registered by :mod:`rsae.saelens_arch`, and
both give the same latents and reconstructions on real SmolLM2-135M activations (layer 3, BBC News).

One RSAE per teacher family is built with ``RationalSAE.from_teacher`` from Remez fits (as the pipeline's
init stage does), and one is produced by a real (tiny) run of the upgrade pipeline on a JumpReLU teacher that
came in as a Gemma Scope ``params.npz``.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from rsae.activations import ResidualCapture
from rsae.data import iter_documents
from rsae.models import load_model
from rsae.remez import remez_fit
from rsae.saes import SAE, JumpReLUSAE, RationalSAE, ReLUSAE, TopKSAE

LAYER = 3
D_SAE = 512


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
def SAELensSAE():
    from sae_lens import SAE as SL

    import rsae.saelens_arch  # noqa: F401  (registers "rational")

    return SL


def _teacher(family: str, acts: torch.Tensor) -> SAE:
    """A teacher whose decoder directions are centred activations, b_dec the mean activation."""
    g = torch.Generator().manual_seed(0)
    mean = acts.mean(0)
    rows = acts[torch.randint(0, acts.shape[0], (D_SAE,), generator=g)] - mean
    rows = rows / rows.norm(dim=1, keepdim=True)
    cls = {"relu": ReLUSAE, "jumprelu": JumpReLUSAE, "topk": TopKSAE}[family]
    t = cls(576, D_SAE, **({"k": 16} if family == "topk" else {}))
    with torch.no_grad():
        t.W_dec.copy_(rows * 0.2)
        t.W_enc.copy_(rows.T / 10)
        # TopK: positive biases keep each token's (k+1)-th pre-activation > 0 even on the ~900-norm outlier
        # tokens, so every token has an ordinary separating threshold (the degenerate case, which used to
        # overflow, is tests/test_families.py::test_topk_gate_stays_finite_on_tokens_with_few_positive_...)
        t.b_enc.copy_(
            (0.5 if family == "topk" else -0.3) * torch.rand(D_SAE, generator=g) + (5.0 if family == "topk" else 0.0)
        )
        t.b_dec.copy_(mean)
        if family == "jumprelu":
            t.log_threshold.copy_((0.2 + torch.rand(D_SAE, generator=g)).log())
    return t.eval()


def _rsae(family: str, teacher: SAE) -> RationalSAE:
    """The pipeline's init: a Remez fit of the family's gate, copied weights, scales as
    rsae.pipeline.initialize sets them."""
    if family == "relu":
        fit = remez_fit("relu", p=5, q=4)
        return RationalSAE.from_teacher(teacher, a=fit.a, b=fit.b, c_in=3.0, c_out=3.0, floor=fit.max_error)
    from rsae.pipeline.initialize import jump_anchor

    c = 0.25
    fit = remez_fit(family, c=c, p=5, q=4, margin=0.1 * c)
    a = jump_anchor(c, 0.1 * c, "upper_edge")  # the teacher's threshold at the band's upper edge
    if family == "jumprelu":
        return RationalSAE.from_teacher(
            teacher,
            a=fit.a,
            b=fit.b,
            c_in=1.0,
            c_out=1.0,
            floor=fit.max_error,
            scale=teacher.threshold / a,
            rational={"jump": c, "anchor": a},
        )
    return RationalSAE.from_teacher(
        teacher,
        a=fit.a,
        b=fit.b,
        c_in=1.0,
        c_out=1.0,
        floor=fit.max_error,
        rational={"jump": c, "anchor": a, "topk_k": teacher.k, "topk_cap": True},
    )


def _same(a, b, x: torch.Tensor) -> None:
    with torch.no_grad():
        za, zb = a.encode(x), b.encode(x)
        assert torch.equal(za != 0, zb != 0)
        torch.testing.assert_close(za, zb, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.decode(za), b.decode(zb), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("family", ["relu", "jumprelu", "topk"])
def test_rsae_loads_in_rsae_and_saelens_with_equal_outputs(SAELensSAE, acts, tmp_path, family):
    from rsae.saelens_arch import RationalSAELens

    rsae = _rsae(family, _teacher(family, acts))
    rsae.metadata = {"hook_name": f"blocks.{LAYER}.hook_resid_post", "model_name": "smollm2-135m"}
    rsae.save(tmp_path / "up")
    loaded = RationalSAE.load(tmp_path / "up")
    _same(loaded, rsae, acts)
    z = loaded.encode(acts)
    assert 0 < (z != 0).sum(-1).float().mean() < D_SAE  # exact zeros and active latents on real activations
    if family == "topk":
        assert (z != 0).sum(-1).max() <= 16

    sl = SAELensSAE.load_from_disk(tmp_path / "up")
    assert type(sl) is RationalSAELens and sl.cfg.architecture() == "rational"
    assert sl.cfg.rational == json.loads((tmp_path / "up" / "cfg.json").read_text())["rational"]
    _same(sl, loaded, acts)
    # SAELens's own hooks see the rational latents
    seen = {}
    sl.hook_sae_acts_post.add_hook(lambda t, hook: seen.setdefault("z", t.detach().clone()))
    with torch.no_grad():
        sl(acts)
    torch.testing.assert_close(seen["z"], z)

    # saved back by SAELens, loaded again by rsae
    sl.save_model(tmp_path / "again")
    _same(RationalSAE.load(tmp_path / "again"), loaded, acts)


def test_pipeline_output_loads_through_saelens(SAELensSAE, acts, tmp_path):
    """A real (tiny) upgrade of a JumpReLU teacher that arrived as a Gemma Scope ``params.npz``."""
    import numpy as np

    from rsae.config import UpgradeConfig
    from rsae.formats import import_teacher
    from rsae.pipeline import run_upgrade

    t = _teacher("jumprelu", acts)
    src = tmp_path / "gemma-scope-res" / f"layer_{LAYER}" / "width_512" / "average_l0_50"
    src.mkdir(parents=True)
    with torch.no_grad():  # Gemma Scope does not subtract b_dec: fold it into b_enc
        np.savez(
            src / "params.npz",
            W_enc=t.W_enc.numpy(),
            W_dec=t.W_dec.numpy(),
            b_dec=t.b_dec.numpy(),
            b_enc=(t.b_enc - t.b_dec @ t.W_enc).numpy(),
            threshold=t.threshold.numpy(),
        )
    det = import_teacher(src, tmp_path / "teacher")
    assert det.format == "gemma_scope" and det.family == "jumprelu"
    cfg = UpgradeConfig(
        layer=LAYER,
        teacher=str(tmp_path / "teacher"),
        data={"train_tokens": 2048, "eval_tokens": 512, "ctx_len": 64, "shard_tokens": 2048},
        calibrate={"steps": 10, "tokens": 1024},
        finetune={"steps": 5, "batch_size": 256, "control": False, "eval_every": 5},
        eval={"ce_sequences": 0, "probe_ks": []},
    )
    run_upgrade(cfg, tmp_path / "out", work_dir=tmp_path / "work")

    ours = RationalSAE.load(tmp_path / "out")
    assert ours.rational_cfg.get("teacher_family") == "jumprelu" and ours.apply_b_dec_to_input is False
    sl = SAELensSAE.load_from_disk(tmp_path / "out")
    _same(sl, ours, acts)
    cfg_json = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert cfg_json["architecture"] == "rational"
    assert cfg_json["metadata"]["teacher"]["sha256"]  # provenance recorded by the package stage

    # hub-ready, faithful outputs (issues 12, 15): every file registered, metadata of the data really used
    from pydantic import TypeAdapter
    from sae_bench.evals.core.eval_output import CoreEvalOutput

    from rsae.pipeline import ARTIFACT_FILES

    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(ARTIFACT_FILES)
    meta = cfg_json["metadata"]
    assert meta["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["model_source"]["alias"] == "smollm2-135m"
    assert meta["hook_name"] == f"blocks.{LAYER}.hook_resid_post"  # Gemma Scope's site, named as it does
    assert (meta["context_size"], meta["prepend_bos"], meta["seqpos_slice"]) == (64, False, [1, None])
    assert meta["dataset_path"] == "bbc-news"
    from safetensors.torch import load_file

    log_sparsity = load_file(out / "sparsity.safetensors")["sparsity"]
    report = json.loads((out / "report.json").read_text())
    assert log_sparsity.shape == (D_SAE,)
    assert (log_sparsity > -10).float().mean().item() == pytest.approx(report["metrics"]["rsae"]["alive_fraction"])
    core = json.loads((out / "core_eval_results.json").read_text())
    TypeAdapter(CoreEvalOutput).validate_python(core)
    assert core["eval_result_metrics"]["sparsity"]["l0"] == pytest.approx(report["metrics"]["rsae"]["l0"])
    assert core["eval_config"]["compute_ce_loss"] is False  # ce_sequences 0: not evaluated, -1 as SAEBench
    assert core["eval_result_metrics"]["model_performance_preservation"]["ce_loss_score"] == -1
    assert set(core["eval_result_unstructured"]["other_saes"]) == {"teacher"}
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: saelens" in card and "| **RSAE (this SAE)** |" in card

"""One small real upgrade per hook site on SmolLM2-135M (BBC News): the site comes from the teacher's cfg, the
activations are those a full forward sees at the site's module, delta CE is measured by splicing at that
site, and the output names the site in the teacher's own naming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rsae.activations import ActivationStore
from rsae.config import UpgradeConfig
from rsae.errors import HookError
from rsae.evaluate import downstream_metrics
from rsae.pipeline import run_upgrade
from rsae.saes import ReLUSAE, load_sae

pytestmark = pytest.mark.slow

TINY = {
    "data": {"train_tokens": 512, "eval_tokens": 128, "ctx_len": 16, "batch_size": 16},
    "calibrate": {"steps": 5, "tokens": 256},
    "finetune": {"steps": 5, "batch_size": 128, "eval_every": 5, "control": False},
    "eval": {"ce_sequences": 1, "probe_ks": []},
}

# (teacher's hook_name, request's hook, module of SmolLM2 (Llama layout), its input or output)
CASES = {
    "hook_resid_pre": ("blocks.1.hook_resid_pre", None, "model.layers.1", "input"),
    "hook_mlp_out": ("model.layers.1.mlp", "blocks.1.hook_mlp_out", "model.layers.1.mlp", "output"),
    "attn.hook_z": ("blocks.1.attn.hook_z", "attn.hook_z", "model.layers.1.self_attn.o_proj", "input"),
}


def _teacher(folder: Path, hook: str) -> Path:
    sae = ReLUSAE(576, 64, metadata={"hook_name": hook, "model_name": "HuggingFaceTB/SmolLM2-135M-Instruct"})
    sae.init_weights(torch.Generator().manual_seed(0))
    return sae.save(folder)


@torch.no_grad()
def _seen_by_full_forward(model, module: str, io: str, ids: torch.Tensor) -> torch.Tensor:
    """What a plain torch hook on ``module`` sees during a full forward (first input or output)."""
    seen = {}
    m = model.get_submodule(module)

    def pre(mod, a, k):
        seen.setdefault("x", a[0] if a else k["hidden_states"])

    def post(mod, a, o):
        seen.setdefault("x", o[0] if isinstance(o, tuple) else o)

    h = m.register_forward_pre_hook(pre, with_kwargs=True) if io == "input" else m.register_forward_hook(post)
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        h.remove()
    return seen["x"]


@pytest.mark.parametrize("case", list(CASES))
def test_upgrade_at_each_hook_site(case: str, tmp_path: Path):
    teacher_hook, request_hook, module, io = CASES[case]
    teacher = _teacher(tmp_path / "teacher", teacher_hook)
    cfg = UpgradeConfig(teacher=str(teacher), hook=request_hook, **TINY)  # no layer: the teacher's
    report = run_upgrade(cfg, tmp_path / "out", work_dir=tmp_path / "work")
    assert report["host_model"]["hook"] == teacher_hook and report["host_model"]["layer"] == 1
    assert report["config"]["hook"] == teacher_hook and report["config"]["layer"] == 1
    # the artifact names the site as the teacher did
    cfg_json = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert cfg_json["metadata"]["hook_name"] == teacher_hook
    # the activations are those of the site, positions 1.. (the attention sink dropped)
    from rsae.models import load_model

    model, _ = load_model("smollm2-135m")
    store = ActivationStore(tmp_path / "work" / "acts-eval")
    assert store.manifest["hook"] == teacher_hook
    ids, _ = store.sequences(1)
    seen = _seen_by_full_forward(model, module, io, ids)
    # to float rounding: the pipeline ran the sequence in a batch, here alone (other GEMM kernels on some CPUs)
    torch.testing.assert_close(seen[:, 1:].reshape(-1, 576), store.load(15), rtol=1e-4, atol=1e-4)
    # delta CE was measured by splicing at this site (recomputed here on the same sequences)
    rsae = load_sae(tmp_path / "out")
    ds = downstream_metrics(model, None, {"rsae": rsae}, ids, hook=teacher_hook)
    assert ds["rsae"]["ce_spliced"] == pytest.approx(report["metrics"]["rsae"]["ce_spliced"], rel=1e-5)
    assert ds["zero"]["ce"] == pytest.approx(report["metrics"]["rsae"]["ce_zero"], rel=1e-5)
    # what SAELens needs to run the RSAE at the site: hook_z inputs are [batch, pos, n_heads, d_head]
    assert cfg_json["reshape_activations"] == ("hook_z" if case == "attn.hook_z" else "none")
    if case == "attn.hook_z":
        _saelens_runs_it_on_heads(tmp_path / "out", rsae, store.load(64), model.config.num_attention_heads)


@torch.no_grad()
def _saelens_runs_it_on_heads(folder: Path, ours, x: torch.Tensor, n_heads: int) -> None:
    """``sae_lens.SAE.load_from_disk`` of an ``attn.hook_z`` artifact encodes [1, n, n_heads, d_head] (TransformerLens's
    hook_z) as rsae encodes the flattened [n, n_heads * d_head], and reconstructs in the heads' shape."""
    from sae_lens import SAE as SL

    from rsae import saelens_arch  # noqa: F401  (registers "rational")

    sl = SL.load_from_disk(folder)
    assert sl.cfg.reshape_activations == "hook_z" and sl.cfg.metadata.hook_name.endswith("attn.hook_z")
    assert sl.cfg.metadata.get("hook_head_index") is None
    heads = x.reshape(1, x.shape[0], n_heads, -1)
    z = ours.encode(x)
    assert 0 < (z != 0).float().mean() < 1
    z_sl = sl.encode(heads)
    assert z_sl.shape == (1, x.shape[0], ours.d_sae) and torch.equal(z_sl[0] != 0, z != 0)
    torch.testing.assert_close(z_sl[0], z, rtol=1e-5, atol=1e-5)
    out = sl(heads)
    assert out.shape == heads.shape
    torch.testing.assert_close(out.reshape(x.shape), ours(x), rtol=1e-5, atol=1e-4)


def test_a_request_contradicting_the_teacher_fails_before_any_work(tmp_path: Path):
    teacher = _teacher(tmp_path / "teacher", "blocks.1.hook_mlp_out")
    with pytest.raises(HookError) as e:
        run_upgrade(UpgradeConfig(teacher=str(teacher), layer=2, **TINY), tmp_path / "out", work_dir=tmp_path / "w")
    assert e.value.field == "layer" and not (tmp_path / "w" / "acts-train").exists()

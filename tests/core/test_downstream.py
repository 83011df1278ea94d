"""Downstream metrics from the cached lower blocks (rsae.hooks.LowerBlocks) equal those of full spliced forwards:
CE clean / zero / spliced, delta CE and its SE, loss recovered, KL and the paired differences, on the tiny random
model of every supported layout at every site, and on the real SmolLM2 over BBC News sequences; the lower blocks
really do not run in the spliced forwards, and the model is left as it was."""

from __future__ import annotations

import pytest
import torch

from rsae.errors import HookError
from rsae.evaluate import EVAL_BATCH_SIZES, downstream_metrics, eval_batch_size
from rsae.hooks import HookSplice, LowerBlocks, site_for, site_width
from rsae.models import decoder_layers
from rsae.saes import ReLUSAE
from support.tinymodels import CONFIGS, ids, tiny

HOOKS = (
    "blocks.0.hook_resid_pre",  # nothing below but the embeddings
    "blocks.1.hook_resid_post",  # block 1 itself replayed, its output spliced
    "blocks.1.hook_mlp_out",  # inside block 1
    "blocks.1.attn.hook_z",  # an input inside block 1
    "blocks.2.hook_resid_post",  # the last block: only the final norm and the LM head compute
)


def _saes(width: int, n: int = 2) -> dict[str, ReLUSAE]:
    """``n`` random ReLU SAEs of input width ``width`` (d_sae 32), named a, b, ..."""
    out = {}
    for i in range(n):
        sae = ReLUSAE(width, 32)
        sae.init_weights(torch.Generator().manual_seed(10 + i))
        out["ab"[i]] = sae.eval()
    return out


def _assert_same(got: dict, ref: dict, rel: float) -> None:
    """Every number of two downstream_metrics results agrees to ``rel`` (None where the reference is None)."""
    assert got.keys() == ref.keys()
    for col, fields in ref.items():
        assert got[col].keys() == fields.keys(), col
        for k, v in fields.items():
            if isinstance(v, dict):
                for kk, vv in v.items():
                    assert got[col][k][kk] == pytest.approx(vv, rel=rel, abs=1e-7), (col, k, kk)
            else:
                assert got[col][k] == pytest.approx(v, rel=rel, abs=1e-7), (col, k)


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_cached_lower_blocks_give_the_full_forward_metrics(arch, hook):
    """Five 12-token sequences in batches of 2 (a short last batch): the cached path equals the reference of
    four full forwards per batch, the splices are live (KL to clean > 0), and block 0's
    sub-layers run once per batch (the clean forward) instead of four times (none at blocks.0.hook_resid_pre,
    whose lower part is the embedding alone)."""
    model = tiny(arch)
    site = site_for(model, hook=hook)
    saes = _saes(site_width(model, site))
    x = ids(7, n=5)
    calls = []
    block0 = decoder_layers(model)[0]
    sub = next(m for m in block0.children() if any(True for _ in m.parameters()))
    handle = sub.register_forward_hook(lambda *a: calls.append(1))
    try:
        ref = downstream_metrics(model, None, saes, x, hook=hook, batch_size=2, reuse_lower_blocks=False)
        n_ref, calls[:] = len(calls), []
        got = downstream_metrics(model, None, saes, x, hook=hook, batch_size=2)
    finally:
        handle.remove()
    _assert_same(got, ref, rel=1e-5)
    assert n_ref == 3 * (2 + len(saes))  # 3 batches x (clean, zero, a, b)
    assert len(calls) == (n_ref if hook == "blocks.0.hook_resid_pre" else 3)
    assert got["zero"]["kl"] > 0 and got["a"]["kl"] > 0 and got["clean"]["tokens"] == 5 * 10
    assert not any("forward" in b.__dict__ for b in decoder_layers(model))  # restored


@pytest.mark.parametrize("arch", list(CONFIGS))
@torch.no_grad()
def test_replayed_spliced_forward_is_the_full_spliced_forward_bit_for_bit(arch):
    """With the same splice, the logits of a forward whose lower blocks are replayed equal those of a full
    forward exactly (rotary tables, masks, sliding windows and embeddings come from the model's own forward)."""
    model, x = tiny(arch), ids(5, n=3)
    for hook in ("blocks.1.hook_resid_post", "blocks.1.attn.hook_z", "blocks.2.hook_mlp_out"):
        site = site_for(model, hook=hook)
        lower = LowerBlocks(model, site)
        with HookSplice(model, site) as splice:
            clean = lower.record(model, x).logits
            splice.fn = lambda a: 0.5 * a + 0.1
            full = model(input_ids=x, use_cache=False).logits
            with lower:
                replayed = model(input_ids=x, use_cache=False).logits
        assert torch.equal(replayed, full) and not torch.equal(full, clean), hook


@torch.no_grad()
def test_replay_needs_a_record_and_restores_the_blocks():
    """Entering before a clean forward is refused (field hook); after the ``with`` the blocks compute again,
    even when the body raised."""
    model = tiny("llama")
    lower = LowerBlocks(model, site_for(model, hook="blocks.1.hook_mlp_out"))
    with pytest.raises(HookError) as e:
        lower.__enter__()
    assert e.value.field == "hook"
    x = ids(3)
    clean = lower.record(model, x).logits
    with pytest.raises(RuntimeError), lower:
        assert torch.equal(model(input_ids=x, use_cache=False).logits, clean)  # nothing spliced: the same
        raise RuntimeError
    assert not any("forward" in b.__dict__ for b in decoder_layers(model))
    assert torch.equal(model(input_ids=ids(4), use_cache=False).logits, model(input_ids=ids(4)).logits)


def test_batch_size_by_device():
    assert eval_batch_size("cpu") == EVAL_BATCH_SIZES["cpu"] == 8
    assert eval_batch_size("cuda:0") == EVAL_BATCH_SIZES["cuda"] > 8
    assert eval_batch_size("meta") == 8


@pytest.fixture(scope="module")
def smollm2():
    from rsae.data import iter_sequences
    from rsae.models import load_model

    model, tok = load_model("smollm2-135m")
    seqs = iter_sequences(tok, "bbc-news", "eval", ctx_len=32, eval_fraction=0.2, seed=0)
    x = torch.tensor([next(seqs)[0] for _ in range(3)])
    return model, x


@pytest.mark.slow
@pytest.mark.parametrize("hook", ["blocks.3.hook_resid_post", "blocks.3.attn.hook_z"])
def test_real_model_metrics_equal_the_full_forward_ones(smollm2, hook):
    """SmolLM2-135M on three 32-token BBC News sequences (batches of 2): the same CE clean / zero / spliced, delta
    CE, loss recovered, KL and paired differences as full spliced forwards."""
    model, x = smollm2
    saes = _saes(site_width(model, site_for(model, hook=hook)))
    ref = downstream_metrics(model, None, saes, x, hook=hook, batch_size=2, reuse_lower_blocks=False)
    got = downstream_metrics(model, None, saes, x, hook=hook, batch_size=2)
    _assert_same(got, ref, rel=1e-5)
    assert got["a"]["delta_ce"] > 0 and 0 < got["zero"]["kl"]

"""Hook sites on every supported host-model layout: the truncated forward equals the full forward at the hook,
bit for bit; the sites are the tensors their TransformerLens names mean; splicing at a site is live and the
identity splice changes nothing. Tiny random-weight models built from each architecture's config class (no
download), and the real SmolLM2."""

from __future__ import annotations

import pytest
import torch

from rsae.errors import ModelError
from rsae.hooknames import LAYOUTS, choose_site, layout_for_config, parse_hook, resolve, site_width
from rsae.hooks import HookCapture, HookSplice, layout_of, site_for
from rsae.hooks import site_width as model_site_width
from support.tinymodels import CONFIGS, ids, tiny

# Written out by hand, independently of rsae.hooknames.LAYOUTS: (module of block 1, "in"/"out") per site.
_BLOCKS = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}
_SUB = {
    "gpt2": {"attn_out": "attn", "mlp_out": "mlp", "z": "attn.c_proj"},
    "gpt_neox": {"attn_out": "attention", "mlp_out": "mlp", "z": "attention.dense"},
    "gemma2": {
        "attn_out": "post_attention_layernorm",
        "mlp_out": "post_feedforward_layernorm",
        "z": "self_attn.o_proj",
    },
}
_SUB["gemma3"] = _SUB["gemma2"]
_DEFAULT_SUB = {"attn_out": "self_attn", "mlp_out": "mlp", "z": "self_attn.o_proj"}
SITES = ("blocks.1.hook_resid_pre", "blocks.1.hook_resid_post", "blocks.1.hook_attn_out", "blocks.1.hook_mlp_out",
         "blocks.1.attn.hook_z")  # fmt: skip


def expected_module(arch: str, hook: str) -> tuple[str, str]:
    """(module path, "in"/"out") that a TransformerLens name means on ``arch``, from the hand-written table."""
    block = f"{_BLOCKS.get(arch, 'model.layers')}.1"
    site = hook.split(".", 2)[2]
    if site == "hook_resid_pre":
        return block, "in"
    if site == "hook_resid_post":
        return block, "out"
    key = {"hook_attn_out": "attn_out", "hook_mlp_out": "mlp_out", "attn.hook_z": "z"}[site]
    return f"{block}.{_SUB.get(arch, _DEFAULT_SUB)[key]}", "in" if key == "z" else "out"


@torch.no_grad()
def plain_hook(model, path: str, io: str, input_ids: torch.Tensor):
    """What a full forward sees at module ``path`` (its first input or output), with a bare torch hook;
    also returns the logits."""
    seen = {}
    module = model.get_submodule(path)

    def pre(m, a, k):
        seen.setdefault("x", (a[0] if a else k["hidden_states"]).clone())

    def post(m, a, o):
        seen.setdefault("x", (o[0] if isinstance(o, tuple) else o).clone())

    if io == "in":
        h = module.register_forward_pre_hook(pre, with_kwargs=True)
    else:
        h = module.register_forward_hook(post)
    try:
        logits = model(input_ids=input_ids, use_cache=False).logits
    finally:
        h.remove()
    return seen["x"], logits


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_layout_table_matches_structure(arch):
    """The model_type entry of LAYOUTS is what the module structure alone gives, and what the hand-written
    table of this test says."""
    model = tiny(arch)
    assert LAYOUTS[model.config.model_type] == layout_of(model) == layout_of(model, table=False)
    for hook in SITES:
        site = site_for(model, hook=hook)
        assert (site.module, "in" if site.io == "input" else "out") == expected_module(arch, hook)


@pytest.mark.parametrize("hook", SITES)
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_truncated_capture_equals_full_forward(arch, hook):
    """The truncated capture equals what a plain forward hook sees at the module in a full forward, bit for
    bit, and the truncated pass never reaches the LM head."""
    model = tiny(arch)
    x = ids()
    full, _ = plain_hook(model, *expected_module(arch, hook), x)
    heads = []
    h = model.get_output_embeddings().register_forward_hook(lambda *a: heads.append(1))
    try:
        with HookCapture(model, site_for(model, hook=hook)) as cap:
            got = cap.run(model, x)
    finally:
        h.remove()
    assert heads == [] and got.dtype == torch.float32
    assert torch.equal(got, full)


@pytest.mark.parametrize("arch", list(CONFIGS))
@torch.no_grad()
def test_sites_mean_what_their_names_say(arch):
    """resid_pre / resid_post are hidden_states[L] / [L + 1] of the full model; resid_pre + attn_out + mlp_out
    = resid_post (the attention and MLP contributions, after Gemma's post-norms); z is the per-head output,
    n_heads * d_head wide, that the output projection maps to the attention output."""
    model, x, cfg = tiny(arch), ids(2), CONFIGS[arch]()
    got = {}
    for hook in SITES:
        with HookCapture(model, site_for(model, hook=hook)) as cap:
            got[hook.split(".", 2)[2]] = cap.run(model, x)
    hs = model(input_ids=x, output_hidden_states=True).hidden_states
    assert torch.equal(got["hook_resid_pre"], hs[1]) and torch.equal(got["hook_resid_post"], hs[2])
    total = got["hook_resid_pre"] + got["hook_attn_out"] + got["hook_mlp_out"]
    torch.testing.assert_close(total, got["hook_resid_post"], rtol=1e-5, atol=1e-5)
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    head_dim = getattr(cfg, "head_dim", None) or 64 // heads
    assert got["attn.hook_z"].shape == (2, 12, heads * head_dim)
    proj = model.get_submodule(expected_module(arch, "blocks.1.attn.hook_z")[0])
    proj_out, _ = plain_hook(model, expected_module(arch, "blocks.1.attn.hook_z")[0], "out", x)
    torch.testing.assert_close(proj(got["attn.hook_z"]), proj_out)
    assert site_width(cfg.to_dict(), parse_hook("blocks.1.attn.hook_z")) == heads * head_dim
    assert model_site_width(model, site_for(model, hook="blocks.1.attn.hook_z")) == heads * head_dim


@pytest.mark.parametrize("hook", [*SITES, "model.layers.1.mlp"])
@pytest.mark.parametrize("arch", list(CONFIGS))
@torch.no_grad()
def test_identity_splice_leaves_logits_unchanged_and_zero_splice_does_not(arch, hook):
    """Splicing the identity reconstruction at a site gives the clean logits bit for bit; splicing zeros
    changes them (the splice is live at that site)."""
    model = tiny(arch)
    if hook.startswith("model.layers") and arch in _BLOCKS:
        hook = hook.replace("model.layers", _BLOCKS[arch])
    x = ids(3)
    clean = model(input_ids=x, use_cache=False).logits
    splice = HookSplice(model, site_for(model, hook=hook))
    try:
        splice.fn = lambda a: a.clone()
        same = model(input_ids=x, use_cache=False).logits
        splice.fn = torch.zeros_like
        zero = model(input_ids=x, use_cache=False).logits
    finally:
        splice.remove()
    assert torch.equal(same, clean)
    assert not torch.allclose(zero[:, 2:], clean[:, 2:])
    assert torch.equal(zero[:, 0], clean[:, 0])  # position 0 is left alone
    assert torch.equal(model(input_ids=x, use_cache=False).logits, clean)  # removed


@pytest.mark.parametrize("arch", ["gemma2", "llama"])
def test_hf_module_path_is_the_module_output(arch):
    """An HF module path captures that module's output (as SAELens's HookedProxyLM): on Llama
    model.layers.1.mlp is hook_mlp_out; on Gemma-2 it is the MLP before its post-norm, another tensor."""
    model, x = tiny(arch), ids()
    with HookCapture(model, site_for(model, hook="model.layers.1.mlp")) as cap:
        mlp = cap.run(model, x)
    with HookCapture(model, site_for(model, hook="blocks.1.hook_mlp_out")) as cap:
        mlp_out = cap.run(model, x)
    assert torch.equal(mlp, plain_hook(model, "model.layers.1.mlp", "out", x)[0])
    assert torch.equal(mlp, mlp_out) == (arch == "llama")
    assert site_for(model, hook="model.layers.1").site == "resid_post"
    with pytest.raises(ModelError) as e:
        site_for(model, hook="model.layers.1.nope")
    assert e.value.field == "hook"
    with pytest.raises(ModelError) as e:
        site_for(model, hook="blocks.3.hook_mlp_out")
    assert e.value.field == "layer"


# -- naming rules (no model) --------------------------------------------------------------------------


LLAMA = LAYOUTS["llama"]


def test_parse_names():
    assert parse_hook("blocks.5.attn.hook_z").site == "z"
    assert parse_hook("hook_mlp_out", layer=2).name == "blocks.2.hook_mlp_out"
    assert parse_hook("hook_z", layer=2).name == "blocks.2.attn.hook_z"
    assert parse_hook("model.layers.7.self_attn").layer == 7
    assert resolve(parse_hook("model.layers.7.self_attn"), LLAMA).site == "attn_out"
    assert resolve(parse_hook("model.layers.7.self_attn"), LAYOUTS["gemma2"]).site is None
    for bad, kw in (("blocks.5.hook_nope", {}), ("hook_mlp_out", {}), ("blocks.x.hook_z", {}), ("", {})):
        with pytest.raises(ModelError) as e:
            parse_hook(bad, **kw)
        assert e.value.field == "hook"
    with pytest.raises(ModelError):  # another model's module path
        resolve(parse_hook("transformer.h.3.mlp"), LLAMA)
    assert layout_for_config({"model_type": "gemma3_text"}) == LAYOUTS["gemma2"]
    assert layout_for_config({"model_type": "mamba"}) is None


def test_site_from_teacher_request_or_both():
    t = "blocks.5.hook_mlp_out"
    assert choose_site(None, None, t, LLAMA).site.name == t  # nothing asked: the teacher's site
    assert choose_site(5, None, t, LLAMA).site.name == t  # its layer: its site
    assert choose_site(None, "hook_mlp_out", t, LLAMA).site.name == t  # a bare site takes the teacher's layer
    assert choose_site(5, None, None, LLAMA).site.name == "blocks.5.hook_resid_post"  # legacy default
    # the same site in HF naming: agreed, recorded in the teacher's naming
    same = choose_site(None, "model.layers.5.mlp", t, LLAMA)
    assert same.site.name == t and not same.notes
    assert choose_site(None, "blocks.5.hook_resid_post", "model.layers.5", LLAMA).site.name == "model.layers.5"


@pytest.mark.parametrize(
    ("layer", "hook", "teacher", "layout", "field"),
    [
        (None, "blocks.5.hook_resid_pre", "blocks.5.hook_mlp_out", LLAMA, "hook"),
        (4, None, "blocks.5.hook_mlp_out", LLAMA, "layer"),
        (4, "blocks.5.hook_mlp_out", None, LLAMA, "layer"),
        (None, "model.layers.5.mlp", "blocks.5.hook_mlp_out", LAYOUTS["gemma2"], "hook"),
        (None, "blocks.5.hook_attn_out", "blocks.5.attn.hook_z", None, "hook"),
        (None, None, None, LLAMA, "layer"),
        (None, None, "not a hook", LLAMA, "layer"),
    ],
)
def test_contradictions_name_the_field(layer, hook, teacher, layout, field):
    with pytest.raises(ModelError) as e:
        choose_site(layer, hook, teacher, layout)
    assert e.value.field == field
    if teacher and field != "layer" or (layer == 4 and hook is None):
        chosen = choose_site(layer, hook, teacher, layout, allow_override=True)
        assert chosen.notes and "allow_hook_override" in chosen.notes[-1]


def test_without_layout_mixed_styles_are_left_to_the_worker():
    assert choose_site(None, "model.layers.5.mlp", "blocks.5.hook_mlp_out", None).site.name == "blocks.5.hook_mlp_out"

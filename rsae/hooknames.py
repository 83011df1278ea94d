"""Hook sites by name: TransformerLens names, Hugging Face module paths, host-model layouts, and which site an
upgrade reads (the request, the teacher's cfg, or both when they agree). Pure Python: no torch, no model load.

Names (the conventions SAELens meets; ``sae_lens`` ``HookedProxyLM`` and TransformerLens ``HookedTransformer``):

- TransformerLens style ``blocks.{L}.hook_resid_pre``, ``blocks.{L}.hook_resid_post``,
  ``blocks.{L}.hook_attn_out``, ``blocks.{L}.hook_mlp_out``, ``blocks.{L}.attn.hook_z``. On a transformers
  model each is a tensor at a module of block L, given by the model's :class:`Layout`:
  ``hook_resid_pre`` the block's input, ``hook_resid_post`` its output, ``hook_attn_out`` / ``hook_mlp_out``
  what the attention / MLP sub-layer adds to the residual stream (Gemma-2/3: after the post-sub-layer
  RMSNorm, as TransformerLens's ``ln1_post`` / ``ln2_post`` and Gemma Scope), ``attn.hook_z`` the input of the
  attention output projection: the per-head z [.., n_heads, d_head] flattened to [.., n_heads * d_head]
  head-major, which is what SAELens's ``reshape_activations: "hook_z"`` feeds an SAE.
- A Hugging Face module path inside a block (``model.layers.5``, ``model.layers.5.mlp``,
  ``transformer.h.3.attn``): that module's output (its first element when it returns a tuple), exactly what
  SAELens's ``HookedProxyLM`` hooks. On Gemma-2/3, ``model.layers.5.mlp`` is the MLP before its post-norm,
  so it is *not* ``blocks.5.hook_mlp_out``.
- A bare site (``hook_mlp_out``, ``attn.hook_z``, ``hook_z``, ...) together with a layer.

Two names are the same site when they resolve to the same (module, input/output) of the model's layout;
without a layout (the API, for a model whose ``config.json`` is not at hand) only names of one style can be
compared, and the worker decides the rest with the model loaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from .errors import HookError

SITES: tuple[str, ...] = ("resid_pre", "resid_post", "attn_out", "mlp_out", "z")
"""Supported TransformerLens sites (keys of :data:`TL_SUFFIX`)."""

TL_SUFFIX: dict[str, str] = {
    "resid_pre": "hook_resid_pre",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "z": "attn.hook_z",
}
"""TransformerLens hook name suffix of each site: ``blocks.{L}.<suffix>``."""

_BARE = {v: k for k, v in TL_SUFFIX.items()} | {"hook_z": "z"}
_TL = re.compile(r"blocks\.(\d{1,4})\.(hook_resid_pre|hook_resid_post|hook_attn_out|hook_mlp_out|attn\.hook_z)")
_HF = re.compile(r"((?:[A-Za-z_]\w*\.)*?[A-Za-z_]\w*)\.(\d{1,4})((?:\.[A-Za-z_]\w*)*)")

BLOCK_PATHS: tuple[str, ...] = (
    "model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
    "model.language_model.layers",
)
"""Where transformers causal LMs keep their blocks (Llama/Mistral/Qwen/Gemma, GPT-2, GPT-NeoX, OPT,
multimodal Gemma-3)."""


@dataclass(frozen=True)
class Layout:
    """Where the TransformerLens sites sit in one transformers architecture (module paths relative to a block).

    Attributes:
        blocks: path of the blocks' ``ModuleList`` (``model.layers``).
        attn_out: the module whose output the block adds to the residual as the attention contribution.
        mlp_out: likewise for the MLP.
        z: the attention output projection, whose *input* is z (heads flattened, head-major).
    """

    blocks: str
    attn_out: str | None = None
    mlp_out: str | None = None
    z: str | None = None


_PRE_NORM = Layout("model.layers", "self_attn", "mlp", "self_attn.o_proj")
_SANDWICH = Layout("model.layers", "post_attention_layernorm", "post_feedforward_layernorm", "self_attn.o_proj")
LAYOUTS: dict[str, Layout] = {
    "llama": _PRE_NORM,  # SmolLM2
    "mistral": _PRE_NORM,
    "qwen2": _PRE_NORM,
    "qwen3": _PRE_NORM,
    "gemma": _PRE_NORM,
    "gemma2": _SANDWICH,  # post-attention / post-feedforward RMSNorms inside the residual branch
    "gemma3_text": _SANDWICH,
    "gpt2": Layout("transformer.h", "attn", "mlp", "attn.c_proj"),
    "gpt_neox": Layout("gpt_neox.layers", "attention", "mlp", "attention.dense"),
}
"""Layouts by ``config.model_type``; the parity tests check each against a full forward. Other models get a
layout from their module structure (:func:`rsae.hooks.layout_of`)."""


@dataclass(frozen=True)
class HookSite:
    """One hook site of a host model.

    Attributes:
        layer: block index L (0-based).
        site: a key of :data:`TL_SUFFIX`, or None for a plain module path.
        name: the name to record (as the request or the teacher spelled it; canonical TL for a bare site).
        module: full module path in the model (None until resolved against a layout).
        io: ``"output"`` (the module's output, first element of a tuple) or ``"input"`` (its first input).
    """

    layer: int
    site: str | None
    name: str
    module: str | None = None
    io: Literal["input", "output"] = "output"

    @property
    def tl_name(self) -> str | None:
        """``blocks.{L}.<suffix>`` for a TransformerLens site, else None."""
        return f"blocks.{self.layer}.{TL_SUFFIX[self.site]}" if self.site else None

    def key(self) -> tuple[Any, ...]:
        """What identifies the tensor: (module, io) once resolved, else the TL site or the raw path."""
        if self.module is not None:
            return (self.module, self.io)
        return ("tl", self.layer, self.site) if self.site else ("path", self.name)


def parse_hook(name: str, *, layer: int | None = None, field: str = "hook") -> HookSite:
    """Parse a hook name (TL name, HF module path inside a block, or a bare site with ``layer``).

    Returns:
        An unresolved :class:`HookSite` (``module`` None); a bare site gets its canonical TL name.

    Raises:
        HookError: the name is none of the above, or a bare site without a layer (``field``).
    """
    s = name.strip()
    m = _TL.fullmatch(s)
    if m:
        return HookSite(int(m.group(1)), _BARE[m.group(2)], s)
    if s in _BARE:
        if layer is None:
            raise HookError(f"hook {s!r} names no layer: give 'layer' or a full name like 'blocks.5.{s}'", field=field)
        site = _BARE[s]
        return HookSite(layer, site, f"blocks.{layer}.{TL_SUFFIX[site]}")
    m = _HF.fullmatch(s)
    if m and not s.startswith("blocks."):
        return HookSite(int(m.group(2)), None, s)
    raise HookError(
        f"hook {s!r} is not a TransformerLens name (blocks.L.hook_resid_pre|hook_resid_post|hook_attn_out|"
        "hook_mlp_out|attn.hook_z), a bare site with 'layer', or a module path inside a block (model.layers.L[.sub])",
        field=field,
    )


def resolve(site: HookSite, layout: Layout | None, *, field: str = "hook") -> HookSite:
    """``site`` with ``module`` and ``io`` filled from ``layout`` (unchanged when ``layout`` is None).

    A module path that is the block itself or its attention / MLP output module becomes that TL site
    (``model.layers.5`` is ``blocks.5.hook_resid_post`` on every layout; ``model.layers.5.mlp`` is
    ``hook_mlp_out`` on Llama but a plain module on Gemma-2).

    Raises:
        HookError: a module path outside ``layout.blocks``, or a site this layout lacks (``field``).
    """
    if layout is None:
        return site
    block = f"{layout.blocks}.{site.layer}"
    if site.site is None:
        if not (site.name == block or site.name.startswith(block + ".")):
            raise HookError(
                f"hook {site.name!r} is not a module of a block of this model (its blocks are {layout.blocks}.L)",
                field=field,
            )
        rest = site.name[len(block) + 1 :]
        found = {"": "resid_post", layout.attn_out: "attn_out", layout.mlp_out: "mlp_out"}.get(rest)
        return HookSite(site.layer, found, site.name, site.name, "output")
    if site.site == "resid_pre":
        return HookSite(site.layer, site.site, site.name, block, "input")
    if site.site == "resid_post":
        return HookSite(site.layer, site.site, site.name, block, "output")
    rel = {"attn_out": layout.attn_out, "mlp_out": layout.mlp_out, "z": layout.z}[site.site]
    if rel is None:
        raise HookError(f"hook {site.name!r}: this model's layout has no {site.site} site", field=field)
    return HookSite(site.layer, site.site, site.name, f"{block}.{rel}", "input" if site.site == "z" else "output")


def layout_for_config(config: dict[str, Any] | None) -> Layout | None:
    """The :data:`LAYOUTS` entry of a model's ``config.json`` (its ``model_type``), else None."""
    if not isinstance(config, dict):
        return None
    return LAYOUTS.get(str(config.get("model_type")))


def site_width(config: dict[str, Any] | None, site: HookSite) -> int | None:
    """Width of the activations at ``site`` from a model's ``config.json``, or None when unknown.

    Residual, attention-out and MLP-out sites: ``hidden_size`` (``n_embd``); ``attn.hook_z``:
    ``num_attention_heads`` (``n_head``) x ``head_dim`` (default ``hidden_size / heads``). Module paths: None.
    """
    if not isinstance(config, dict) or (site.site is None and site.module is None):
        return None
    d = config.get("hidden_size", config.get("n_embd"))
    if site.site is None:
        return None
    if site.site != "z":
        return int(d) if isinstance(d, int) else None
    heads = config.get("num_attention_heads", config.get("n_head"))
    if not isinstance(heads, int) or heads <= 0:
        return None
    head_dim = config.get("head_dim")
    if not isinstance(head_dim, int):
        head_dim = d // heads if isinstance(d, int) else None
    return heads * head_dim if head_dim else None


@dataclass(frozen=True)
class SiteChoice:
    """The site an upgrade reads and why.

    Attributes:
        site: the resolved :class:`HookSite` (its ``name`` in the teacher's own naming when the request
            agrees with the teacher's cfg).
        notes: report notes (an override of the teacher's cfg, a site taken from it).
    """

    site: HookSite
    notes: tuple[str, ...] = ()


def choose_site(
    layer: int | None,
    hook: str | None,
    teacher_hook: str | None,
    layout: Layout | None,
    *,
    allow_override: bool = False,
) -> SiteChoice:
    """The site an upgrade reads, from the request (``layer``, ``hook``) and the teacher's cfg ``hook_name``.

    Rules: a request that names nothing takes the teacher's site; ``layer`` alone takes the teacher's site
    when the teacher sits at that layer, else (no teacher hook) ``blocks.L.hook_resid_post``; a ``hook``
    is read as named (a bare site takes ``layer``, else the teacher's layer). A request whose site differs
    from the teacher's is refused unless ``allow_override`` (then it is read where the request says, with a
    note). Sites compare by module and input/output on ``layout`` (so ``model.layers.5`` equals
    ``blocks.5.hook_resid_post``); with no layout only names of one style are compared.

    Raises:
        HookError: field ``layer`` (neither the request nor the teacher names a site; ``layer`` contradicts
            ``hook`` or the teacher), field ``hook`` (unparseable, not in this model, or another site than the
            teacher's), each saying how to override.
    """
    notes: list[str] = []
    teacher: HookSite | None = None
    if teacher_hook:
        try:
            teacher = resolve(parse_hook(teacher_hook, field="teacher"), layout, field="teacher")
        except HookError:
            teacher = None  # a teacher site this model cannot read: only a request naming the same string agrees
    if hook is None and layer is None:
        if teacher is None:
            why = f"its hook_name {teacher_hook!r} is not a readable site" if teacher_hook else "it names no hook"
            raise HookError(f"give 'layer' or 'hook': the teacher's cfg cannot supply one ({why})", field="layer")
        return SiteChoice(teacher, (f"hook {teacher.name} taken from the teacher's cfg",))
    override = " (set settings.data.allow_hook_override to read it elsewhere anyway)"
    if hook is None:
        if teacher is not None and teacher.layer == layer:
            return SiteChoice(teacher, (f"hook {teacher.name} taken from the teacher's cfg",))
        req = resolve(HookSite(layer, "resid_post", f"blocks.{layer}.hook_resid_post"), layout)
        if teacher_hook and not allow_override:
            why = f"layer {layer} contradicts the teacher's cfg hook_name {teacher_hook!r}"
            raise HookError(why + override, field="layer")
    else:
        req = resolve(parse_hook(hook, layer=layer if layer is not None else _layer(teacher)), layout)
        if layer is not None and req.layer != layer:
            raise HookError(f"layer {layer} contradicts hook {hook!r} (layer {req.layer})", field="layer")
        if teacher_hook and not _same(req, teacher, teacher_hook, layout) and not allow_override:
            why = f"hook {hook!r} contradicts the teacher's cfg hook_name {teacher_hook!r}"
            raise HookError(why + override, field="hook")
        if teacher is not None and _same(req, teacher, teacher_hook, layout):
            return SiteChoice(teacher)  # the same site: recorded in the teacher's own naming
    if teacher_hook:
        notes.append(f"teacher cfg names hook {teacher_hook!r}; this upgrade reads {req.name!r} (allow_hook_override)")
    return SiteChoice(req, tuple(notes))


def _layer(site: HookSite | None) -> int | None:
    return None if site is None else site.layer


def _same(req: HookSite, teacher: HookSite | None, teacher_hook: str | None, layout: Layout | None) -> bool:
    """Whether the request's site is the teacher's; undecidable pairs (no layout, mixed styles) count as the
    same here and are decided again with the model loaded."""
    if teacher is None:
        return req.name == (teacher_hook or "").strip()
    if layout is None and (req.site is None) != (teacher.site is None):
        return True
    return req.key() == teacher.key()

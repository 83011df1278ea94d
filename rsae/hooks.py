"""Reading and replacing activations at a hook site of a transformers causal LM (:mod:`rsae.hooknames`).

:class:`HookCapture` records the tensor at a site with a forward (pre-)hook and, by default, ends the forward
pass right there by raising an internal exception: the truncated forward *is* the full forward interrupted,
so the embeddings (Gemma's sqrt(d) scaling, GPT-2's learned positions), rotary position ids, causal and
sliding-window masks are computed by the model's own code and the captured tensor equals what a full forward
sees at that module bit for bit (``tests/core/test_hooks.py`` checks GPT-2, Llama, Gemma-2, Gemma-3,
Qwen-2/3, GPT-NeoX and Mistral layouts, and SmolLM2). Later blocks, the final norm and the LM head never run.

:class:`HookSplice` replaces the tensor at a site by ``fn(x)`` during a full forward (delta CE and KL are
measured where the SAE sits). Activations are [batch, positions, width]; ``attn.hook_z`` is the
attention output projection's input [b, T, n_heads * d_head] (heads flattened, head-major, as SAELens's
``reshape_activations: "hook_z"``).

:class:`LowerBlocks` makes the spliced forwards of an evaluation start at the site: one clean forward records
the output of the last block below the site, and while entered every block below the site returns that record
instead of computing. The model's own forward still runs around them (embeddings, rotary position embeddings,
causal / sliding-window masks, the blocks from the site up, the final norm, the LM head), so the blocks above
see exactly what a full forward gives them on every layout (docs/performance.md, "Evaluation").
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .errors import HookError, ModelError
from .hooknames import LAYOUTS, HookSite, Layout, parse_hook, resolve
from .models import decoder_layers

_ATTN = ("self_attn", "attn", "attention")
_MLP = ("mlp", "feed_forward")
_OUT_PROJ = ("o_proj", "c_proj", "dense", "out_proj")


class _StopForward(Exception):
    """Raised by a capture hook to end the forward pass at the site (truncated forward)."""


def _has(module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def layout_of(model, *, table: bool = True) -> Layout:
    """The :class:`rsae.hooknames.Layout` of a loaded model: its ``config.model_type`` entry of
    :data:`rsae.hooknames.LAYOUTS` when every module of it exists, else found from the module structure
    (blocks as :func:`rsae.models.decoder_layers`; attention ``self_attn``/``attn``/``attention``, MLP
    ``mlp``/``feed_forward``, output projection ``o_proj``/``c_proj``/``dense``/``out_proj``; a block with
    ``pre_``/``post_feedforward_layernorm`` has Gemma-2's post-sub-layer norms). Sites it cannot find are None.
    ``table=False`` skips the table (the tests check that both agree).

    Raises:
        ModelError: the model's blocks cannot be found (field ``model``).
    """
    known = LAYOUTS.get(getattr(model.config, "model_type", None)) if table else None
    if (
        known is not None
        and _has(model, f"{known.blocks}.0")
        and all(_has(model, f"{known.blocks}.0.{p}") for p in (known.attn_out, known.mlp_out, known.z) if p)
    ):
        return known
    blocks = decoder_layers(model)
    path = next(n for n, m in model.named_modules() if m is blocks)
    block = blocks[0]
    attn = next((a for a in _ATTN if _has(block, a)), None)
    mlp = next((a for a in _MLP if _has(block, a)), None)
    proj = next((f"{attn}.{p}" for p in _OUT_PROJ if attn and _has(block, f"{attn}.{p}")), None)
    if _has(block, "pre_feedforward_layernorm") and _has(block, "post_feedforward_layernorm"):
        return Layout(path, "post_attention_layernorm", "post_feedforward_layernorm", proj)
    return Layout(path, attn, mlp, proj)


def site_for(model, layer: int | None = None, hook: str | HookSite | None = None) -> HookSite:
    """The resolved site of ``model`` named by ``hook`` (a name or a :class:`HookSite`), or
    ``blocks.{layer}.hook_resid_post`` when ``hook`` is None.

    Raises:
        ModelError: a layer out of range (field ``layer``). HookError: a bad name, a module that does not exist
            (field ``hook``).
    """
    if hook is None:
        if layer is None:
            raise HookError("give a layer or a hook", field="layer")
        site = HookSite(layer, "resid_post", f"blocks.{layer}.hook_resid_post")
    else:
        site = parse_hook(hook, layer=layer) if isinstance(hook, str) else hook
    n = len(decoder_layers(model))
    if not 0 <= site.layer < n:
        raise ModelError(f"layer {site.layer} out of range: the model has {n} blocks (0..{n - 1})", field="layer")
    site = resolve(site, layout_of(model)) if site.module is None else site
    if not _has(model, site.module):
        raise HookError(f"hook {site.name!r}: the model has no module {site.module!r}", field="hook")
    return site


def _first(value: Any) -> torch.Tensor:
    """A hook's tensor: the value itself, or the first element of a tuple."""
    return value[0] if isinstance(value, tuple) else value


def _input_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """A module's first input (positional, or ``hidden_states=`` as transformers' blocks may be called)."""
    return args[0] if args else kwargs["hidden_states"]


class _SiteHook:
    """Registers ``self._fire`` at a site (forward hook on the output, or pre-hook on the input) while entered."""

    def __init__(self, model, site: HookSite) -> None:
        self.site = site
        self.module = model.get_submodule(site.module)
        self._handle = None

    def _on(self, x: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError

    def _output_hook(self, module, args, output):
        new = self._on(_first(output))
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    def _input_hook(self, module, args, kwargs):
        new = self._on(_input_of(args, kwargs))
        if new is None:
            return None
        if args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}

    def __enter__(self):
        if self._handle is not None:  # already registered (HookSplice registers on construction)
            return self
        if self.site.io == "input":
            self._handle = self.module.register_forward_pre_hook(self._input_hook, with_kwargs=True)
        else:
            self._handle = self.module.register_forward_hook(self._output_hook)
        return self

    def __exit__(self, *exc) -> bool:
        self.remove()
        return False

    def remove(self) -> None:
        """Unregister the hook (idempotent)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class HookCapture(_SiteHook):
    """Context manager recording the activations at a site.

    Args:
        model: a transformers causal LM.
        site: a resolved :class:`HookSite` (:func:`site_for`).
        stop: end the forward pass at the site (truncated forward); False lets it run to the logits.
    """

    def __init__(self, model, site: HookSite, *, stop: bool = True) -> None:
        super().__init__(model, site)
        self.stop = stop
        self.value: torch.Tensor | None = None

    def _on(self, x: torch.Tensor) -> None:
        self.value = x.detach()
        if self.stop:
            raise _StopForward

    @torch.no_grad()
    def run(self, model, input_ids: torch.Tensor) -> torch.Tensor:
        """Activations at the site for ``input_ids`` [b, T] -> [b, T, width] float32 (must be entered)."""
        self.value = None
        try:
            model(input_ids=input_ids, use_cache=False)
        except _StopForward:
            pass
        if self.value is None:
            raise HookError(f"hook {self.site.name!r} did not fire during the forward pass", field="hook")
        return self.value.float()


class HookSplice(_SiteHook):
    """Replaces positions ``start:`` of the activations at a site by ``fn(x)`` while ``fn`` is set.

    ``fn`` maps rows [n, width] float32 to [n, width] (an SAE's forward); None leaves the forward untouched. The
    rows are handed to ``fn`` in float32 whatever the model's dtype (a bfloat16 host model, ``settings.model_dtype``)
    and its output is cast back to the model's dtype. Registered on construction; call :meth:`remove` (or use it
    as a context manager).
    """

    def __init__(self, model, site: HookSite, *, start: int = 1) -> None:
        super().__init__(model, site)
        self.start = start
        self.fn: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.__enter__()

    def _on(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.fn is None:
            return None
        new = x.clone()
        part = x[:, self.start :, :]
        new[:, self.start :, :] = self.fn(part.reshape(-1, part.shape[-1]).float()).reshape(part.shape).to(x.dtype)
        return new


def _copy(value: Any) -> Any:
    """A detached copy of a block's output (a tensor, or a tuple whose tensors are copied)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple):
        return tuple(_copy(v) for v in value)
    return value


class LowerBlocks:
    """The blocks below a site, computed once per batch by a clean forward and replayed in spliced forwards.

    The skipped blocks are 0..L-1 for a site inside block L or at its input (``hook_resid_pre``,
    ``hook_attn_out``, ``hook_mlp_out``, ``attn.hook_z``, module paths), and 0..L for ``hook_resid_post`` (the
    block's own output: its :class:`HookSplice` still fires on the replayed output). :meth:`record` runs a full
    clean forward and keeps a copy of the last skipped block's output [b, T, d_model] (as the block returns it);
    inside ``with`` each skipped block's ``forward`` returns a copy of that record without computing, while the
    model's forward, the blocks above and every hook run as usual. Valid for forwards on the same ``input_ids``
    as the last :meth:`record`. Hooks registered on the replayed blocks themselves fire again on the replayed
    output: during :meth:`record` only the splice at the site may be registered there, with ``fn`` None.

    Args:
        model: a transformers causal LM; site: a resolved :class:`HookSite` (:func:`site_for`).

    Raises:
        HookError: entered before a record (field ``hook``).
    """

    def __init__(self, model, site: HookSite) -> None:
        blocks = decoder_layers(model)
        own_output = site.io == "output" and model.get_submodule(site.module) is blocks[site.layer]
        self.blocks = [blocks[i] for i in range(site.layer + int(own_output))]
        self.site = site
        self.value: Any = None
        self._saved: list[tuple[torch.nn.Module, Any]] = []

    @torch.no_grad()
    def record(self, model, input_ids: torch.Tensor):
        """The model's output on ``input_ids`` [b, T] (a full forward), recording the lower blocks' output."""
        self.value = None
        if not self.blocks:
            return model(input_ids=input_ids, use_cache=False)

        def keep(module, args, output):
            self.value = _copy(output)

        handle = self.blocks[-1].register_forward_hook(keep)
        try:
            return model(input_ids=input_ids, use_cache=False)
        finally:
            handle.remove()

    def _replay(self, *args, **kwargs) -> Any:
        return _copy(self.value)

    def __enter__(self) -> "LowerBlocks":
        if self.blocks and self.value is None:
            raise HookError(f"hook {self.site.name!r}: no clean forward recorded before the replay", field="hook")
        for block in self.blocks:
            self._saved.append((block, block.__dict__.get("forward")))
            block.forward = self._replay
        return self

    def __exit__(self, *exc) -> bool:
        for block, own in self._saved:
            if own is None:
                del block.forward
            else:
                block.forward = own
        self._saved = []
        return False


@torch.no_grad()
def site_width(model, site: HookSite) -> int:
    """Width of the activations at ``site`` (one truncated forward of two tokens)."""
    device = next(model.parameters()).device
    with HookCapture(model, site) as cap:
        return cap.run(model, torch.tensor([[1, 2]], device=device)).shape[-1]

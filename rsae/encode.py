"""Per-token top-k latents of SAEs on text or on raw activations, as tools (dashboards, the encode API) want them.

Text is fed to the host model the way the SAE's data was (:class:`rsae.data.ContextConventions`): tokenized without
special tokens (as :func:`rsae.data.iter_sequences` does), cut into contexts of at most ``context_size`` tokens
with the BOS token first when ``prepend_bos`` (SAELens's ``concat_and_batch_sequences`` for one document, except
that the last, shorter context is kept), and run only up to the hook site (:class:`rsae.hooks.HookCapture`, the
truncated forward that equals the full forward there bit for bit). A position is *kept*, i.e. encoded, when the
conventions keep it (``slice(*seqpos_slice)`` of the context positions, less the excluded special tokens), as the
SAE was trained; the others (e.g. position 0, the attention sink, under the project's default conventions) carry
no latents. Raw activations ``[n, d_in]`` are encoded as they are.

Which site and conventions: for an upgrade's artifact folder, those its ``report.json`` records (``host_model``,
``data.conventions``), else its ``cfg.json`` metadata (:func:`site_of_artifacts`); for a teacher, its
``cfg.json`` metadata as an upgrade would resolve them (:func:`site_of_teacher`).

Top-k: the ``k`` largest latent values of each token in decreasing order, exact zeros left out (so fewer than
``k`` when fewer latents fire); ties keep :func:`torch.topk`'s order.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .data import ContextConventions, resolve_conventions, special_tokens
from .errors import DataError, ModelError
from .hooks import HookCapture, site_for
from .models import bundled_name
from .saes import CFG_NAME, SAE

REPORT_NAME = "report.json"
"""The report file of an upgrade's artifact folder."""


@dataclass(frozen=True)
class EncodeSite:
    """Where and how an SAE reads its host model.

    Attributes:
        model: model spec for :func:`rsae.models.load_model` (bundled name, hub id or folder).
        hook: hook name of the site (:func:`rsae.hooks.site_for`), e.g. ``blocks.3.hook_resid_post``.
        layer: the block of the site, when known.
        conventions: the context conventions of the SAE's data.
    """

    model: str
    hook: str
    layer: int | None
    conventions: ContextConventions


@dataclass(frozen=True)
class Context:
    """One sequence fed to the host model: ``ids`` (token ids, at most ``context_size``), the index of the text
    it comes from and its position among that text's contexts, and per position whether it is encoded."""

    text: int
    index: int
    ids: list[int]
    kept: list[bool]


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path`` ({} when the file is absent)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path.name}: {e}", field="sae") from None
    return data if isinstance(data, dict) else {}


def site_of_artifacts(folder: str | Path, model: str | None = None) -> EncodeSite:
    """The site and conventions an upgrade's artifact folder was fitted on.

    Args:
        folder: the job's artifact folder (``report.json`` and ``cfg.json``; either suffices).
        model: the model spec to load instead of the recorded one (the service passes the job's request).

    Raises:
        DataError: neither file names a hook or a model (field ``sae``).
    """
    folder = Path(folder)
    report = _read_json(folder / REPORT_NAME)
    meta = _read_json(folder / CFG_NAME).get("metadata") or {}
    host = report.get("host_model") or {}
    upgrade = meta.get("upgrade_config") or {}
    name = model or host.get("name") or upgrade.get("model") or bundled_name(meta.get("model_name"))
    hook = host.get("hook") or meta.get("hook_name")
    if not name or not hook:
        raise DataError(f"{folder.name} records no host model or hook", field="sae")
    conv = (report.get("data") or {}).get("conventions")
    if conv:
        conventions = resolve_conventions({}, {k: v for k, v in conv.items() if k != "sources"})
    else:
        conventions = resolve_conventions({}, meta)
    return EncodeSite(str(name), str(hook), host.get("layer", meta.get("hook_layer")), conventions)


def site_of_teacher(sae: SAE, model: str | None = None, hook: str | None = None) -> EncodeSite:
    """The site and conventions of a teacher from its ``cfg.json`` metadata (``model_name``, ``hook_name``, the
    SAELens conventions, resolved as an upgrade without requested conventions resolves them); ``model`` and
    ``hook`` override the recorded ones.

    Raises:
        ModelError: no model recorded nor given (field ``model``). HookError-like ModelError: no hook (``hook``).
        DataError: malformed recorded conventions (:func:`rsae.data.resolve_conventions`).
    """
    meta = sae.metadata or {}
    name = model or bundled_name(meta.get("model_name"))
    if not name:
        raise ModelError("the SAE records no model_name; name the host model", field="model")
    site = hook or meta.get("hook_name")
    if not site:
        raise ModelError("the SAE records no hook_name; name the hook", field="hook")
    layer = meta.get("hook_layer")
    return EncodeSite(str(name), str(site), layer if isinstance(layer, int) else None, resolve_conventions({}, meta))


def text_contexts(tokenizer, texts: Sequence[str], conv: ContextConventions) -> list[Context]:
    """The contexts fed to the model for ``texts``: each text tokenized without special tokens and cut into
    pieces of ``context_size`` tokens (``context_size - 1`` after a prepended BOS); a text without tokens gives
    none. Kept positions: ``slice(*seqpos_slice)`` of ``range(context_size)`` less positions whose token is an
    excluded special token (:func:`rsae.data.special_tokens`).

    Raises:
        DataError: the conventions' tokens are not in the tokenizer (:func:`rsae.data.special_tokens`).
    """
    tokens = special_tokens(conv, tokenizer)
    kept_positions = set(conv.kept_positions)
    room = conv.context_size - (tokens.bos is not None)
    out: list[Context] = []
    for t, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        for i, start in enumerate(range(0, len(ids), room)):
            ctx = ([tokens.bos] if tokens.bos is not None else []) + list(ids[start : start + room])
            kept = [p in kept_positions and tok not in tokens.excluded for p, tok in enumerate(ctx)]
            out.append(Context(t, i, ctx, kept))
    return out


@torch.no_grad()
def site_activations(model, hook: str, contexts: Sequence[Context], *, layer: int | None = None, batch_size: int = 8):
    """Activations at ``hook`` of every context: a list of tensors [len(ids), width] float32 on the model's
    device, in the order of ``contexts``. Contexts of equal length are batched (``batch_size`` at a time), so no
    padding enters the forward.

    Raises:
        ModelError / HookError: the model has no such site (fields ``layer`` / ``hook``).
    """
    device = next(model.parameters()).device
    out: list[torch.Tensor | None] = [None] * len(contexts)
    by_length: dict[int, list[int]] = {}
    for i, c in enumerate(contexts):
        by_length.setdefault(len(c.ids), []).append(i)
    with HookCapture(model, site_for(model, layer, hook)) as cap:
        for members in by_length.values():
            for b in range(0, len(members), batch_size):
                chunk = members[b : b + batch_size]
                ids = torch.tensor([contexts[i].ids for i in chunk], dtype=torch.long, device=device)
                acts = cap.run(model, ids)
                for j, i in enumerate(chunk):
                    out[i] = acts[j]
    return out


def top_latents(z: torch.Tensor, k: int) -> list[dict[str, list]]:
    """Per row of latents ``z`` [n, d_sae]: ``{"indices": [...], "values": [...]}``, the ``k`` largest values in
    decreasing order without exact zeros (float values as Python floats)."""
    values, indices = z.float().topk(min(k, z.shape[-1]), dim=-1)
    nonzero = values != 0
    out = []
    for v, i, m in zip(values.cpu().tolist(), indices.cpu().tolist(), nonzero.cpu().tolist(), strict=True):
        out.append({"indices": [x for x, keep in zip(i, m, strict=True) if keep], "values": [x for x in v if x != 0]})
    return out


def _check_width(saes: Mapping[str, SAE], width: int, field: str) -> None:
    for name, sae in saes.items():
        if sae.d_in != width:
            raise DataError(f"the {name} SAE reads d_in={sae.d_in} values per token but got {width}", field=field)


@torch.no_grad()
def encode_rows(saes: Mapping[str, SAE], x: torch.Tensor, k: int) -> dict[str, list[dict[str, list]]]:
    """Top-k latents of each SAE for activations ``x`` [n, d_in] (moved to each SAE's device).

    Raises:
        DataError: ``x`` is not [n, d_in] of every SAE (field ``activations``).
    """
    if x.ndim != 2:
        raise DataError("activations must be a list of rows of d_in numbers", field="activations")
    _check_width(saes, x.shape[1], "activations")
    return {name: top_latents(sae.encode(x.to(sae.W_enc.device, torch.float32)), k) for name, sae in saes.items()}


@torch.no_grad()
def encode_texts(
    model, tokenizer, saes: Mapping[str, SAE], texts: Sequence[str], site: EncodeSite, k: int, *, batch_size: int = 8
) -> list[list[dict[str, Any]]]:
    """Top-k latents of each SAE for every token of ``texts``, run through ``model`` at ``site``.

    Returns:
        Per text, its tokens in order: ``{"context", "position", "token_id", "token" (the decoded token),
        "kept", "latents": {sae name: {"indices", "values"}} or None for a position the conventions do not keep}``.

    Raises:
        DataError: an SAE's ``d_in`` differs from the site's width (field ``hook``); bad conventions.
        ModelError / HookError: the model has no such site.
    """
    contexts = text_contexts(tokenizer, texts, site.conventions)
    acts = site_activations(model, site.hook, contexts, layer=site.layer, batch_size=batch_size)
    out: list[list[dict[str, Any]]] = [[] for _ in texts]
    for ctx, a in zip(contexts, acts, strict=True):
        _check_width(saes, a.shape[-1], "hook")
        rows = [p for p, keep in enumerate(ctx.kept) if keep]
        tops = encode_rows(saes, a[rows], k) if rows else {}
        where = {p: n for n, p in enumerate(rows)}
        for p, tok in enumerate(ctx.ids):
            latents = {name: tops[name][where[p]] for name in saes} if p in where else None
            token = {"context": ctx.index, "position": p, "token_id": tok, "token": tokenizer.decode([tok])}
            out[ctx.text].append({**token, "kept": p in where, "latents": latents})
    return out


def count_tokens(tokenizer, texts: Sequence[str], conv: ContextConventions) -> int:
    """Tokens :func:`encode_texts` would feed the model for ``texts`` (BOS tokens included)."""
    return sum(len(c.ids) for c in text_contexts(tokenizer, texts, conv))

"""Activation extraction at a hook site to safetensors shards, and a bounded-memory reader.

Extraction runs the host model only up to the hook site (:mod:`rsae.hooks`; by default the residual stream
``blocks.L.hook_resid_post`` = ``hidden_states[L + 1]`` of the full model; also ``hook_resid_pre``,
``hook_attn_out``, ``hook_mlp_out``, ``attn.hook_z`` or a module path): a forward hook captures the tensor
and ends the pass, so later modules, the final norm and the LM head never run. (Truncating the model and
reading ``output_hidden_states`` instead is wrong: transformers applies the final norm to the last entry.)

Which tokens go in and which positions are kept follow the context conventions
(:class:`rsae.data.ContextConventions`, SAELens ``metadata``): sequences of ``context_size`` tokens (BOS first
if ``prepend_bos``), documents concatenated and chunked as SAELens does; the activations of the positions
``slice(*seqpos_slice)`` are kept, less special-token positions if ``exclude_special_tokens``. The default for
a teacher without conventions drops position 0 only: on SmolLM2 it is an attention sink whose residual norm is
~10-30x the median. The manifest records the conventions.

Shard ``shard_NNNNN.safetensors`` holds whole sequences: ``acts`` [rows, d_in] float32, ``input_ids``
[k, context_size] int64, ``label`` [k] int64 (category index or -1) and ``row_counts`` [k] int64 (rows of each
sequence, in order; all equal to ``len(kept positions)`` unless special tokens are excluded). Without exclusion,
row ``i * r + j`` of ``acts`` is the ``j``-th kept position of sequence ``i`` (``r`` = ``rows_per_sequence`` of
the manifest). Memory during extraction is one shard plus one batch, independent of the token count.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import load_file, save_file

from .data import BBC_CATEGORIES, ContextConventions, SourceOptions, iter_sequences, legacy_conventions, special_tokens
from .errors import DataError
from .hooknames import HookSite
from .hooks import HookCapture, site_for

MANIFEST = "manifest.json"


class ResidualCapture(HookCapture):
    """Context manager: :class:`rsae.hooks.HookCapture` at ``blocks.{layer}.hook_resid_post`` (the output of
    block ``layer``), ending the forward there unless ``stop=False``.

    Raises:
        ModelError: ``layer`` out of range (field ``layer``).
    """

    def __init__(self, model, layer: int, *, stop: bool = True) -> None:
        super().__init__(model, site_for(model, layer), stop=stop)


def _label_index(label: str | None) -> int:
    return BBC_CATEGORIES.index(label) if label in BBC_CATEGORIES else -1


def _manifest(
    *,
    site: HookSite,
    d_in: int,
    ctx_len: int,
    rows: int,
    dataset: str,
    split: str,
    eval_fraction: float,
    seed: int,
    shards: list[dict],
    mean_norm: float,
    norms_sample: torch.Tensor,
    conventions: ContextConventions | None = None,
) -> dict:
    """The ``manifest.json`` of an extracted split (format ``rsae-activations/1``); ``norms_sample``: residual
    norms [m] of a sample of rows, for the outlier statistics."""
    median = norms_sample.median().item()
    conv = conventions or legacy_conventions(ctx_len)
    kept = conv.kept_positions
    return {
        "format": "rsae-activations/1",
        "layer": site.layer,
        "hook": site.name,
        "d_in": d_in,
        "ctx_len": ctx_len,
        "position_0_dropped": 0 not in kept,
        "rows_per_sequence": None if conv.exclude_special_tokens else len(kept),
        "conventions": conv.to_dict(),
        "rows": rows,
        "dataset": dataset,
        "split": split,
        "eval_fraction": eval_fraction,
        "seed": seed,
        "labels": list(BBC_CATEGORIES),
        "shards": shards,
        "stats": {
            "mean_norm": mean_norm,
            "median_norm_sample": median,
            "frac_norm_above_3x_median_sample": (norms_sample > 3 * median).float().mean().item(),
        },
    }


class _ShardWriter:
    """Buffers whole sequences and writes them as one safetensors shard per :meth:`flush` (temp file +
    ``os.replace``), keeping at most ``n_tokens`` rows in all; reports the fraction written to ``on_progress``;
    keeps the residual-norm statistics of the manifest (``sum_norm``, ``norms_sample``)."""

    def __init__(self, out_dir: Path, n_tokens: int, on_progress: Callable[[float], None] | None) -> None:
        self.out_dir, self.n_tokens, self.on_progress = out_dir, n_tokens, on_progress
        self.shards: list[dict] = []
        self.done_rows = 0
        self.acts: list[torch.Tensor] = []
        self.ids: list[torch.Tensor] = []
        self.labels: list[int] = []
        self.counts: list[int] = []
        self.d_in: int | None = None
        self.sum_norm = 0.0
        self.norms_sample: list[torch.Tensor] = []

    def add_batch(self, resid: list[torch.Tensor], ids: torch.Tensor, labels: list[int], seqs_per_shard: int) -> None:
        """Buffer a batch of sequences (the kept activations of each, ``resid[i]`` [r_i, d_in], token ids
        [b, context_size], label indices [b]), flushing a shard whenever ``seqs_per_shard`` sequences are buffered
        (so a shard never holds more than ``shard_tokens`` rows); record residual-norm statistics (the first 64
        batches' norms)."""
        self.d_in = resid[0].shape[-1]
        norms = torch.cat(list(resid)).norm(dim=-1)
        self.sum_norm += norms.sum().item()
        if len(self.norms_sample) < 64:
            self.norms_sample.append(norms)
        for i, label in enumerate(labels):
            self.acts.append(resid[i])
            self.counts.append(resid[i].shape[0])
            self.ids.append(ids[i])
            self.labels.append(label)
            if len(self.ids) == seqs_per_shard:
                self.flush()

    def flush(self) -> None:
        """Write the buffered sequences as the next shard (no-op when empty)."""
        if not self.acts:
            return
        acts = torch.cat(self.acts)
        keep = min(acts.shape[0], self.n_tokens - self.done_rows)
        acts = acts[:keep].contiguous()
        name = f"shard_{len(self.shards):05d}.safetensors"
        tmp = self.out_dir / f".{name}.{uuid.uuid4().hex}.tmp"  # unique per write
        tensors = {
            "acts": acts,
            "input_ids": torch.stack(self.ids),
            "label": torch.tensor(self.labels),
            "row_counts": torch.tensor(self.counts, dtype=torch.int64),
        }
        save_file(tensors, str(tmp))
        os.replace(tmp, self.out_dir / name)
        self.shards.append({"file": name, "rows": keep, "sequences": len(self.ids)})
        self.done_rows += keep
        self.acts, self.ids, self.labels, self.counts = [], [], [], []
        if self.on_progress:
            self.on_progress(self.done_rows / self.n_tokens)


def _next_batch(it, size: int) -> list:
    """Up to ``size`` items of iterator ``it`` (fewer at its end)."""
    batch = []
    for item in it:
        batch.append(item)
        if len(batch) == size:
            break
    return batch


def kept_rows(
    resid: torch.Tensor, ids: torch.Tensor, positions: list[int], excluded: frozenset[int]
) -> list[torch.Tensor]:
    """The activations each sequence contributes: positions ``positions`` of ``resid`` [b, T, d_in], less those
    whose token (``ids`` [b, T]) is in ``excluded`` (SAELens: ``seqpos_slice``, then ``exclude_special_tokens``).
    Returns ``b`` tensors [r_i, d_in]."""
    idx = torch.tensor(positions, dtype=torch.long)
    acts = resid[:, idx, :]
    if not excluded:
        return list(acts)
    keep = ~torch.isin(ids[:, idx], torch.tensor(sorted(excluded), dtype=ids.dtype))
    return [acts[i][keep[i]] for i in range(acts.shape[0])]


def _kept(conv: ContextConventions, tokenizer) -> tuple[list[int], frozenset[int]]:
    """``(kept positions, excluded token ids)`` of ``conv`` for ``tokenizer``.

    Raises:
        DataError: ``seqpos_slice`` keeps no position; a token of the conventions the tokenizer lacks.
    """
    positions = conv.kept_positions
    if not positions:
        raise DataError(
            f"seqpos_slice {list(conv.seqpos_slice)} keeps no position of a {conv.context_size}-token sequence",
            field="data.seqpos_slice",
        )
    return positions, special_tokens(conv, tokenizer).excluded


def extract_activations(
    model,
    tokenizer,
    *,
    layer: int | None,
    dataset: str,
    split: str,
    n_tokens: int,
    hook: str | HookSite | None = None,
    out_dir: str | Path,
    ctx_len: int = 128,
    eval_fraction: float = 0.2,
    seed: int = 0,
    batch_size: int = 8,
    shard_tokens: int = 16_384,
    device: str = "cpu",
    meta: dict | None = None,
    on_progress: Callable[[float], None] | None = None,
    conventions: ContextConventions | None = None,
    options: SourceOptions | None = None,
) -> dict:
    """Stream the activations at a hook site of ``split`` to shards in ``out_dir``; write and return the manifest.

    Args:
        model, tokenizer: from :func:`rsae.models.load_model`.
        layer, hook: the site (:func:`rsae.hooks.site_for`): ``hook`` a name (``blocks.5.hook_mlp_out``,
            ``model.layers.5.mlp``) or a :class:`rsae.hooknames.HookSite`; None: ``blocks.{layer}.hook_resid_post``.
        dataset, split, eval_fraction, seed, options: see :func:`rsae.data.iter_sequences`.
        conventions: :func:`rsae.data.resolve_conventions`; None: the legacy ones with ``ctx_len`` tokens.
        n_tokens, shard_tokens: rows wanted (kept positions of whole sequences, cut to exactly ``n_tokens``);
            rows per shard (rounded to whole sequences).
        on_progress: called after every batch with the fraction done; may raise (``Cancelled``) to stop.
    Returns the manifest dict. Raises: DataError (the split has fewer tokens than ``n_tokens``; the conventions
    keep no position), ModelError (``layer`` out of range, or a ``hook`` this model does not have).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    conv = conventions or legacy_conventions(ctx_len)
    ctx_len = conv.context_size
    positions, excluded = _kept(conv, tokenizer)
    seqs_per_shard = max(1, shard_tokens // (rows_per_seq := len(positions)))
    writer = _ShardWriter(out_dir, n_tokens, None)
    it = iter_sequences(
        tokenizer, dataset, split, eval_fraction=eval_fraction, seed=seed, conventions=conv, options=options
    )
    rows = 0
    with HookCapture(model, site_for(model, layer, hook)) as cap:
        while rows < n_tokens:
            batch = _next_batch(it, min(batch_size, math.ceil((n_tokens - rows) / rows_per_seq)))
            if not batch:
                break
            ids = torch.tensor([b[0] for b in batch], dtype=torch.long)
            resid = kept_rows(cap.run(model, ids.to(device)).cpu(), ids, positions, excluded)
            writer.add_batch(resid, ids, [_label_index(d.label) for _, d in batch], seqs_per_shard)
            rows += sum(r.shape[0] for r in resid)
            if on_progress:  # every batch, so that the caller's cancellation check runs between batches
                on_progress(min(1.0, rows / n_tokens))
        writer.flush()
    done_rows, shards = writer.done_rows, writer.shards
    if done_rows < n_tokens:
        raise DataError(
            f"split '{split}' of {dataset!r} yields only {done_rows} tokens at ctx_len={ctx_len}; {n_tokens} requested",
            field=f"data.{'eval' if split == 'eval' else 'train'}_tokens",
        )
    manifest = _manifest(
        site=cap.site,
        d_in=writer.d_in,
        ctx_len=ctx_len,
        rows=done_rows,
        dataset=dataset,
        split=split,
        eval_fraction=eval_fraction,
        seed=seed,
        shards=shards,
        mean_norm=writer.sum_norm / max(1, rows),
        norms_sample=torch.cat(writer.norms_sample),
        conventions=conv,
    ) | (meta or {})
    _write_manifest(out_dir, manifest)
    return manifest


def _write_manifest(out_dir: Path, manifest: dict) -> None:
    """Write ``manifest.json`` last and atomically (unique temp name, then ``os.replace``): never a torn one."""
    tmp = out_dir / f".{MANIFEST}.{uuid.uuid4().hex}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out_dir / MANIFEST)


class ActivationStore:
    """Read-only view of an extracted activation folder (``manifest.json`` + shards).

    Memory: at most two shards at a time while iterating batches.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        f = self.folder / MANIFEST
        if not f.is_file():
            raise DataError(f"no activation manifest at {f}", field="activations")
        self.manifest = json.loads(f.read_text())
        self.d_in: int = self.manifest["d_in"]
        self.rows: int = self.manifest["rows"]
        self.ctx_len: int = self.manifest["ctx_len"]
        self.rows_per_seq: int | None = self.manifest.get("rows_per_sequence", self.ctx_len - 1)
        """Activation rows of every sequence; None when special tokens were excluded (see ``row_counts``)."""

    def shard(self, i: int) -> dict[str, torch.Tensor]:
        """Tensors of shard ``i`` (``acts`` cut to the manifest's row count)."""
        info = self.manifest["shards"][i]
        t = load_file(str(self.folder / info["file"]))
        t["acts"] = t["acts"][: info["rows"]]
        return t

    def iter_shards(self) -> Iterator[dict[str, torch.Tensor]]:
        """Shards in order."""
        for i in range(len(self.manifest["shards"])):
            yield self.shard(i)

    def load(self, max_rows: int | None = None) -> torch.Tensor:
        """The first ``max_rows`` rows (all by default) as one tensor [n, d_in]."""
        out, n = [], 0
        for s in self.iter_shards():
            a = s["acts"]
            if max_rows is not None:
                a = a[: max_rows - n]
            out.append(a)
            n += a.shape[0]
            if max_rows is not None and n >= max_rows:
                break
        return torch.cat(out)

    def iter_ordered(self, batch_size: int, max_rows: int | None = None) -> Iterator[torch.Tensor]:
        """Batches [<= batch_size, d_in] of the first ``max_rows`` rows (all by default) in storage order, one
        shard in memory at a time (a shard's last batch may be smaller). For evaluation: the same rows in the
        same order every call."""
        n = 0
        for s in self.iter_shards():
            a = s["acts"]
            for i in range(0, a.shape[0], batch_size):
                if max_rows is not None and n >= max_rows:
                    return
                b = a[i : i + batch_size]
                if max_rows is not None:
                    b = b[: max_rows - n]
                n += b.shape[0]
                yield b

    def sequences(self, max_sequences: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids [s, ctx_len], label [s])`` of the first ``max_sequences`` sequences."""
        ids, labs, n = [], [], 0
        for s in self.iter_shards():
            ids.append(s["input_ids"])
            labs.append(s["label"])
            n += s["input_ids"].shape[0]
            if max_sequences is not None and n >= max_sequences:
                break
        ids_t, lab_t = torch.cat(ids), torch.cat(labs)
        if max_sequences is not None:
            ids_t, lab_t = ids_t[:max_sequences], lab_t[:max_sequences]
        return ids_t, lab_t

    def iter_batches(
        self, batch_size: int, *, seed: int = 0, epochs: int | None = None, device: str = "cpu"
    ) -> Iterator[torch.Tensor]:
        """Shuffled batches [batch_size, d_in], forever (``epochs=None``) or for ``epochs`` passes.

        Shards are visited in a seeded random order and rows shuffled within a shard; a partial batch at a
        shard boundary is carried into the next shard.
        """
        g = torch.Generator().manual_seed(seed)
        epoch = 0
        carry = torch.empty(0, self.d_in)
        while epochs is None or epoch < epochs:
            for i in torch.randperm(len(self.manifest["shards"]), generator=g).tolist():
                a = self.shard(i)["acts"]
                a = torch.cat([carry, a[torch.randperm(a.shape[0], generator=g)]])
                n_full = a.shape[0] // batch_size
                for b in range(n_full):
                    yield a[b * batch_size : (b + 1) * batch_size].to(device)
                carry = a[n_full * batch_size :]
            epoch += 1

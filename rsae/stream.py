"""Streamed training activations (issue 12): the host model extracts in a background thread while fine-tuning
consumes, through a bounded mixing buffer, so that the training tokens need not all be on disk (25M tokens x
2,304 x 4 bytes would be 230 GB).

The convention is SAELens's (``sae_lens.training.mixing_buffer.mixing_buffer``, fed by its ``ActivationsStore``):
fill a buffer of N rows, shuffle it, hand out half of it as batches, refill the half served with new rows,
shuffle again, and so on; at the end of the source the rest is shuffled and handed out. :func:`mixing_buffer`
is that algorithm with one difference: its permutations come from a seeded ``torch.Generator`` owned by the
stream, where SAELens draws them from torch's global RNG, which here would (a) make the batches depend on
whatever else used the RNG and (b) be shared by the training thread and the extracting thread, so that the two
would race on it. With a seeded generator the same request gives the same batches every run, and a resumed
fine-tuning skips to the same place.

What a pass is: exactly ``rows`` training rows (``settings.data.train_tokens``), the same sequences cut into the
same forward batches as disk mode extracts (:func:`rsae.activations.extract_activations`), so a pass's rows are
the disk mode's rows bit for bit, only the order of the batches differs. Fine-tuning for more rows than one
pass re-extracts (the source restarts); so does the control, which gets the RSAE's batches (same seed).

Memory, whatever ``rows``: the mixing buffer (``buffer_rows``; at most ``buffer_rows`` + one forward batch of rows
while refilling, and the copy that shuffles them), the served half still being consumed, the prefetch queue
(views into it) and one forward pass, with the allocator's slack: about 5 x ``buffer_rows`` x d_in x 4 bytes beside
the host model, training included (measured 0.75 GB at 100k tokens and 0.81 GB at 1M for the default 65,536 rows
at d_in 576: docs/benchmarks.md, section 7).

What stays on disk (:func:`train_disk_rows`): the held-out split, and the first ``stream_disk_tokens`` training
rows (at least ``calibrate.tokens``), an ordinary activation folder whose manifest also records the stream
(``storage``); calibration, the teacher's training L0 (the L0 target), the probes' training sequences and the gate
plot read those rows. :class:`StreamedActivations` is that folder with :meth:`~StreamedActivations.iter_batches`
streaming, so :func:`rsae.train.train_sae` consumes either kind of store through the same iterator of batches.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

import torch

from .activations import MANIFEST, ActivationStore, _kept, _next_batch, kept_rows
from .data import ContextConventions, SourceOptions, iter_sequences
from .errors import DataError
from .hooks import HookCapture, site_for

AUTO_STREAM_BYTES = 4 * 1024**3
"""``activation_storage: auto`` streams when the training rows would take more than this on disk (float32)."""
PREFETCH_BATCHES = 4
"""Batches the extracting thread may hold ready ahead of training."""
STORAGE_FORMAT = "rsae-stream/1"
"""Format of the ``storage`` entry of a streamed split's manifest."""


def storage_mode(requested: str, train_tokens: int, d_in: int) -> Literal["disk", "stream"]:
    """``settings.data.activation_storage`` resolved: ``disk`` or ``stream`` as requested; ``auto``: ``stream`` when
    ``train_tokens`` x ``d_in`` x 4 bytes exceeds :data:`AUTO_STREAM_BYTES`, else ``disk``.

    Raises:
        DataError: an unknown mode (field ``data.activation_storage``).
    """
    if requested == "auto":
        return "stream" if train_tokens * d_in * 4 > AUTO_STREAM_BYTES else "disk"
    if requested not in ("disk", "stream"):
        raise DataError(
            f"activation_storage {requested!r} is not auto, disk or stream", field="data.activation_storage"
        )
    return requested  # type: ignore[return-value]


def train_disk_rows(data: Any, calibrate_tokens: int, d_in: int) -> int:
    """Training rows an upgrade writes to disk: all ``data.train_tokens`` in disk mode; in stream mode
    ``stream_disk_tokens``, at least ``calibrate_tokens``, at most ``train_tokens``.

    Args:
        data: a :class:`rsae.config.DataConfig`. d_in: width of the activations (to resolve ``auto``).
    """
    if storage_mode(data.activation_storage, data.train_tokens, d_in) == "disk":
        return data.train_tokens
    return min(data.train_tokens, max(data.stream_disk_tokens, calibrate_tokens))


def stream_manifest(rows: int, buffer_rows: int, seqs_per_forward: int, requested: str) -> dict[str, Any]:
    """The ``storage`` entry of a streamed split's manifest: ``rows`` per pass, the mixing buffer's rows, sequences
    per forward pass, and the ``activation_storage`` requested."""
    return {
        "format": STORAGE_FORMAT,
        "mode": "stream",
        "requested": requested,
        "rows": rows,
        "buffer_rows": buffer_rows,
        "seqs_per_forward": seqs_per_forward,
    }


def mixing_buffer(
    chunks: Iterable[torch.Tensor], buffer_rows: int, batch_size: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """SAELens's mixing buffer (``sae_lens.training.mixing_buffer.mixing_buffer``, mix fraction 1/2) with the
    permutations drawn from ``generator``.

    Args:
        chunks: row blocks [n_i, d] (any sizes), in source order.
        buffer_rows: rows gathered before each shuffle; half of them stay to mix with the next rows.
        batch_size: rows per batch.
    Yields batches [batch_size, d], each source row at most once; fewer than ``batch_size`` rows left when the
    source ends are dropped. Memory: at most ``buffer_rows`` + one chunk of rows held (plus the shuffle's copy).

    Raises:
        ValueError: ``buffer_rows < 2 * batch_size`` (half a buffer must hold a batch).
    """
    if buffer_rows < 2 * batch_size:
        raise ValueError(f"buffer_rows {buffer_rows} < 2 x batch_size {batch_size}")
    keep = buffer_rows // 2
    store: torch.Tensor | None = None
    for chunk in chunks:
        store = chunk if store is None else torch.cat([store, chunk])
        if store.shape[0] >= buffer_rows:
            store = store[torch.randperm(store.shape[0], generator=generator)]
            n_serve = (store.shape[0] - keep) // batch_size * batch_size
            serve, store = store[:n_serve], store[n_serve:]
            for i in range(0, n_serve, batch_size):
                yield serve[i : i + batch_size]
    if store is not None:
        store = store[torch.randperm(store.shape[0], generator=generator)]
        for i in range(0, store.shape[0] - batch_size + 1, batch_size):
            yield store[i : i + batch_size]


class _Failed:
    """An exception raised in the extracting thread, handed to the consumer."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()


def prefetched(make: Callable[[], Iterator[Any]], size: int = PREFETCH_BATCHES) -> Iterator[Any]:
    """Items of ``make()``, produced in a background thread at most ``size`` ahead of the consumer.

    An exception in the thread is raised here; closing this generator (or dropping it) stops the thread at its
    next item and waits for it, so the producer's own cleanup (a hook's removal) is done when this returns.
    """
    q: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            with contextlib.closing(make()) as items:
                for item in items:
                    if not put(item):
                        return
            put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            put(_Failed(e))

    thread = threading.Thread(target=run, name="rsae-activation-stream", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not _END:
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


class StreamedActivations(ActivationStore):
    """A streamed training split: its on-disk head (an :class:`rsae.activations.ActivationStore` folder whose
    manifest has a ``storage`` entry, :func:`stream_manifest`) whose :meth:`iter_batches` extracts the whole
    split again through a mixing buffer in a background thread.

    ``rows`` and ``manifest["rows"]`` are the rows of a pass (``train_tokens``); ``disk_rows`` those on disk, which
    :meth:`load`, :meth:`iter_ordered`, :meth:`sequences` and :meth:`shard` read.

    Args:
        folder: the head's folder. host_model: returns ``(model, tokenizer)`` (called in the extracting thread on
            first use; :meth:`rsae.pipeline.state.UpgradeState.host_model`). device: where the host model runs.

    Raises:
        DataError: the folder has no manifest, or its manifest records no stream (field ``activations``).
    """

    def __init__(self, folder: str | Path, host_model: Callable[[], tuple[Any, Any]], device: str = "cpu") -> None:
        super().__init__(folder)
        st = self.manifest.get("storage")
        if not isinstance(st, dict) or st.get("mode") != "stream":
            raise DataError(f"{self.folder / MANIFEST} records no activation stream", field="activations")
        self.storage: dict[str, Any] = st
        self.disk_rows = self.rows
        self.rows = int(st["rows"])
        self.manifest = {**self.manifest, "rows": self.rows}
        self._host_model, self._device = host_model, device

    def iter_chunks(self, epochs: int | None = None) -> Iterator[torch.Tensor]:
        """The split's rows in source order, one block [<= seqs_per_forward x rows per sequence, d_in] float32 per
        forward pass (CPU), exactly ``rows`` per pass, for ``epochs`` passes (None: forever). Runs the host model.

        Raises:
            DataError: the split yields fewer than ``rows`` rows (field ``data.train_tokens``); as
                :func:`rsae.data.iter_sequences`. ModelError, HookError: as :func:`rsae.hooks.site_for`.
        """
        m = self.manifest
        model, tok = self._host_model()
        conv = ContextConventions.from_dict(m["conventions"])
        positions, excluded = _kept(conv, tok)
        per_seq, n, bs = len(positions), self.rows, int(self.storage["seqs_per_forward"])
        opts = SourceOptions(**(m.get("source") or {}))
        with HookCapture(model, site_for(model, m["layer"], m["hook"])) as cap:
            epoch = 0
            while epochs is None or epoch < epochs:
                it = iter_sequences(
                    tok, m["dataset"], m["split"], eval_fraction=m["eval_fraction"], seed=m["seed"], conventions=conv,
                    options=opts,
                )  # fmt: skip
                done = 0
                while done < n:
                    batch = _next_batch(it, min(bs, math.ceil((n - done) / per_seq)))
                    if not batch:
                        raise DataError(
                            f"split '{m['split']}' of {m['dataset']!r} yields only {done} tokens at ctx_len="
                            f"{conv.context_size}; {n} requested",
                            field="data.train_tokens",
                        )
                    ids = torch.tensor([b[0] for b in batch], dtype=torch.long)
                    acts = torch.cat(kept_rows(cap.run(model, ids.to(self._device)).cpu(), ids, positions, excluded))
                    acts = acts[: n - done]
                    done += acts.shape[0]
                    yield acts
                epoch += 1

    def iter_batches(
        self, batch_size: int, *, seed: int = 0, epochs: int | None = None, device: str = "cpu"
    ) -> Iterator[torch.Tensor]:
        """Shuffled batches [batch_size, d_in] float32 on ``device``, forever (``epochs=None``) or for ``epochs``
        passes: :meth:`iter_chunks` through :func:`mixing_buffer` (``max(buffer_rows, 2 x batch_size)`` rows,
        permutations seeded by ``seed``), extracted in a background thread (:func:`prefetched`). The same
        ``seed`` gives the same batches. Raises what :meth:`iter_chunks` raises."""
        buffer_rows = max(int(self.storage["buffer_rows"]), 2 * batch_size)

        def batches() -> Iterator[torch.Tensor]:
            g = torch.Generator().manual_seed(seed)
            return mixing_buffer(self.iter_chunks(epochs), buffer_rows, batch_size, g)

        for b in prefetched(batches):
            yield b.to(device)


def open_train(folder: str | Path, host_model: Callable[[], tuple[Any, Any]], device: str = "cpu") -> ActivationStore:
    """The training split in ``folder``: a :class:`StreamedActivations` when its manifest records a stream, else
    an :class:`rsae.activations.ActivationStore`.

    Raises:
        DataError: no manifest in ``folder`` (field ``activations``).
    """
    store = ActivationStore(folder)
    if (store.manifest.get("storage") or {}).get("mode") == "stream":
        return StreamedActivations(folder, host_model, device)
    return store

"""Streamed training activations (:mod:`rsae.stream`): the mixing buffer, the background producer, a streamed
pass against the disk extraction on the real model, and a small streamed upgrade end to end.

That the memory of a streamed fine-tune does not grow with the token count is measured, not tested:
``bench/stream.py`` and docs/benchmarks.md.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from rsae.activations import ActivationStore, extract_activations
from rsae.config import DataConfig, UpgradeConfig
from rsae.errors import DataError
from rsae.hooks import site_for
from rsae.models import load_model
from rsae.pipeline import run_upgrade
from rsae.saes import ReLUSAE
from rsae.stream import (
    AUTO_STREAM_BYTES,
    StreamedActivations,
    mixing_buffer,
    open_train,
    prefetched,
    storage_mode,
    stream_manifest,
    train_disk_rows,
)

CTX = 32


def _row_chunks(sizes: list[int], pulled: list[int]):
    """Chunks [size, 2] whose rows are (global row index, chunk index); ``pulled`` counts chunks taken."""
    start = 0
    for i, n in enumerate(sizes):
        pulled.append(i)
        yield torch.stack([torch.arange(start, start + n), torch.full((n,), i)], 1).float()
        start += n


def test_mixing_buffer_hands_out_each_row_once_shuffled_and_bounded():
    sizes = [37, 5, 120, 64, 1, 99, 300, 17] * 4
    pulled: list[int] = []
    gen = mixing_buffer(_row_chunks(sizes, pulled), 256, 32, torch.Generator().manual_seed(0))
    first = next(gen)
    # The first batch comes once the buffer is full: no more of the source is read than that.
    assert sum(sizes[: len(pulled) - 1]) < 256 <= sum(sizes[: len(pulled)])
    batches = [first, *gen]
    rows = torch.cat(batches)[:, 0].long()
    assert all(b.shape == (32, 2) for b in batches)
    assert len(set(rows.tolist())) == rows.numel()  # each row at most once
    assert sum(sizes) - rows.numel() < 32  # only the last partial batch is dropped
    assert not torch.equal(rows, rows.sort().values)  # shuffled
    assert torch.cat(batches)[:8, 1].unique().numel() > 1  # the first batch mixes chunks
    again = torch.cat(list(mixing_buffer(_row_chunks(sizes, []), 256, 32, torch.Generator().manual_seed(0))))
    other = torch.cat(list(mixing_buffer(_row_chunks(sizes, []), 256, 32, torch.Generator().manual_seed(1))))
    assert torch.equal(again[:, 0].long(), rows) and not torch.equal(other[:, 0].long(), rows)
    with pytest.raises(ValueError, match="2 x batch_size"):
        next(mixing_buffer(_row_chunks(sizes, []), 63, 32, torch.Generator()))


def test_prefetched_raises_the_producers_error_and_stops_on_close():
    cleaned = threading.Event()

    def failing():
        yield 1
        raise DataError("source ran dry", field="data.train_tokens")

    it = prefetched(failing)
    assert next(it) == 1
    with pytest.raises(DataError, match="ran dry"):
        next(it)

    def endless():
        try:
            i = 0
            while True:
                i += 1
                yield i
        finally:
            cleaned.set()

    it = prefetched(endless, size=2)
    assert [next(it) for _ in range(5)] == [1, 2, 3, 4, 5]
    it.close()  # the consumer stops early: the producer is stopped and has cleaned up when close returns
    assert cleaned.is_set()
    assert not [t for t in threading.enumerate() if t.name == "rsae-activation-stream"]


def test_storage_mode_and_disk_rows():
    assert storage_mode("auto", 131_072, 576) == "disk"
    assert storage_mode("auto", AUTO_STREAM_BYTES // (4 * 576) + 1, 576) == "stream"
    assert storage_mode("stream", 1000, 576) == "stream" and storage_mode("disk", 10**9, 2304) == "disk"
    with pytest.raises(DataError) as e:
        storage_mode("ram", 1000, 576)
    assert e.value.field == "data.activation_storage"
    disk = DataConfig(train_tokens=200_000)
    assert train_disk_rows(disk, 4096, 576) == 200_000
    streamed = DataConfig(train_tokens=200_000, activation_storage="stream", stream_disk_tokens=1024)
    assert train_disk_rows(streamed, 4096, 576) == 4096  # at least the calibration rows
    assert train_disk_rows(streamed.model_copy(update={"train_tokens": 2000}), 4096, 576) == 2000


@pytest.fixture(scope="module")
def model_tok():
    return load_model("smollm2-135m")


@pytest.mark.slow
def test_a_streamed_pass_is_the_disk_extraction(model_tok, tmp_path: Path):
    """One pass of the stream is the disk mode's rows in the same order before mixing (equal to float rounding: a
    forward over another number of sequences may take other GEMM kernels); the mixed batches are those rows; the
    capture hook is gone once the consumer stops; a split too small fails like disk mode."""
    model, tok = model_tok
    n = 1500
    kw = {"layer": 1, "dataset": "bbc-news", "split": "train", "ctx_len": CTX}
    extract_activations(model, tok, n_tokens=n, out_dir=tmp_path / "disk", **kw)
    head = extract_activations(
        model,
        tok,
        n_tokens=300,
        out_dir=tmp_path / "head",
        meta={"storage": stream_manifest(n, 512, 8, "stream")},
        **kw,
    )
    disk = ActivationStore(tmp_path / "disk").load()
    store = open_train(tmp_path / "head", lambda: model_tok)
    assert isinstance(store, StreamedActivations) and store.rows == n and store.disk_rows == head["rows"] == 300
    assert store.load().shape == (300, 576)
    torch.testing.assert_close(store.load(), disk[:300], rtol=1e-4, atol=1e-4)  # the head is on disk
    torch.testing.assert_close(torch.cat(list(store.iter_chunks(epochs=1))), disk, rtol=1e-4, atol=1e-4)

    batches = list(store.iter_batches(128, seed=0, epochs=2))
    assert len(batches) == 2 * n // 128 and all(b.shape == (128, 576) and b.dtype == torch.float32 for b in batches)
    mixed = torch.cat(batches)
    nearest = torch.cdist(mixed, disk, compute_mode="donot_use_mm_for_euclid_dist").min(1).values
    # every mixed row is a row of the pass (to float rounding)
    assert (nearest < 1e-2).all(), nearest.max()
    torch.testing.assert_close(torch.cat(list(store.iter_batches(128, seed=0, epochs=2))), torch.cat(batches))
    module = dict(model.named_modules())[site_for(model, 1).module]
    assert not module._forward_hooks and not module._forward_pre_hooks

    gen = store.iter_batches(128, seed=0)
    next(gen)
    gen.close()  # stopped mid-stream
    assert not module._forward_hooks and not module._forward_pre_hooks

    corpus = tmp_path / "small.txt"  # a split of a few hundred tokens, streamed for more
    corpus.write_text(
        "\n\n".join(f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * 12 for i in range(6))
    )
    small = {**kw, "dataset": str(corpus), "eval_fraction": 0.01}
    extract_activations(
        model,
        tok,
        n_tokens=64,
        out_dir=tmp_path / "small",
        meta={"storage": stream_manifest(10**6, 10**6, 8, "stream")},
        **small,
    )
    with pytest.raises(DataError, match="yields only") as e:
        next(open_train(tmp_path / "small", lambda: model_tok).iter_batches(128, epochs=1))
    assert e.value.field == "data.train_tokens"
    assert type(open_train(tmp_path / "disk", lambda: model_tok)) is ActivationStore


@pytest.mark.slow
def test_a_small_streamed_upgrade_ends_with_finite_metrics(tmp_path: Path):
    """The whole pipeline with streamed training activations on the real model: finite metrics, and the report
    says where the rows lived."""
    teacher = ReLUSAE(576, 128)
    teacher.init_weights(torch.Generator().manual_seed(0))
    settings = {
        "data": {"train_tokens": 3000, "eval_tokens": 1024, "ctx_len": CTX, "activation_storage": "stream"},
        "calibrate": {"steps": 10, "tokens": 512},
        "finetune": {"steps": 16, "batch_size": 256, "eval_every": 8},
        "eval": {"ce_sequences": 2, "probe_ks": []},
    }
    settings["data"] |= {"stream_disk_tokens": 600, "stream_buffer_tokens": 1024}
    cfg = UpgradeConfig(layer=1, teacher=str(teacher.save(tmp_path / "t")), **settings)
    report = run_upgrade(cfg, tmp_path / "out", work_dir=tmp_path / "work")
    storage = report["data"]["storage"]
    assert storage == {"mode": "stream", "requested": "stream", "disk_rows": 600, "buffer_rows": 1024}
    assert report["data"]["train"]["rows"] == 3000
    for name in ("teacher", "rsae", "control"):
        m = report["metrics"][name]
        assert all(torch.isfinite(torch.tensor(float(m[k]))) for k in ("mse", "fvu", "l0", "delta_ce")), (name, m)
    assert len(report["finetune"]["curve"]) == 2 and report["host_model"]["dtype"] == "float32"


@pytest.mark.slow
def test_a_streamed_finetune_resumed_mid_way_equals_an_uninterrupted_one(tmp_path: Path):
    """Cancelled after a fine-tuning checkpoint at step 5, rerun: the stream is reopened from the work dir and
    advanced to step 5 (the same seeded batches), so the result equals an uninterrupted run's exactly."""
    from rsae.errors import Cancelled

    teacher = ReLUSAE(576, 128)
    teacher.init_weights(torch.Generator().manual_seed(1))
    cfg = UpgradeConfig(
        layer=1,
        teacher=str(teacher.save(tmp_path / "t")),
        data={"train_tokens": 2048, "eval_tokens": 512, "ctx_len": CTX, "activation_storage": "stream"}
        | {"stream_disk_tokens": 512, "stream_buffer_tokens": 1024},
        calibrate={"steps": 5, "tokens": 512},
        finetune={"steps": 12, "batch_size": 128, "eval_every": 6, "control": False},
        eval={"ce_sequences": 0, "probe_ks": []},
    )
    full = run_upgrade(cfg, tmp_path / "full", work_dir=tmp_path / "w-full")
    events: list[tuple[str, dict]] = []
    with pytest.raises(Cancelled):
        run_upgrade(
            cfg,
            tmp_path / "a",
            work_dir=tmp_path / "w",
            checkpoint_every=5,
            should_cancel=lambda: any(i["name"] == "finetune-rsae" for _, i in events),
            on_checkpoint=lambda kind, info: events.append((kind, info)),
        )
    events.clear()
    again = run_upgrade(
        cfg,
        tmp_path / "b",
        work_dir=tmp_path / "w",
        checkpoint_every=5,
        on_checkpoint=lambda kind, info: events.append((kind, info)),
    )
    resumed = [i for k, i in events if k == "resumed" and i["name"] == "finetune-rsae"]
    assert resumed and resumed[0]["step"] == 5
    assert again["data"]["storage"]["mode"] == "stream"
    assert again["metrics"] == full["metrics"]

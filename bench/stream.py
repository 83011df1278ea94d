"""Benchmark 7, streamed fine-tuning: peak RSS of ``rsae.train.train_sae`` consuming a
``rsae.stream.StreamedActivations`` (the host model extracting in a background thread through the mixing buffer,
nothing on disk but a 1,024-row head) for one pass over 100k and over 1M training tokens. Layer 0 of the bundled
SmolLM2-135M (float32 on CPU), 128-token contexts of BBC News (2% of documents held out so that 1M training tokens
exist), a ReLU SAE 576 -> 576 trained by the dense step at batch 4,096, the default mixing buffer (65,536 rows).
Figures (after one warm-up pass of a buffer's worth of rows): peak RSS above the RSS before the call (host model
loaded), the process's peak, tokens/s.

    .venv/bin/python bench/stream.py [--quick]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

try:
    from bench.common import bench_device, figure, peak_during, quick_cli, reset_peak
except ModuleNotFoundError:  # run as a script
    from common import bench_device, figure, peak_during, quick_cli, reset_peak  # type: ignore[no-redef]

import torch

BENCH = "stream"
MODEL = "smollm2-135m"
FULL = {"tokens": (100_000, 1_000_000), "ctx": 128, "batch": 4096, "buffer": 65_536, "d_sae": 576, "layer": 0}
QUICK = {"tokens": (2_000, 8_000), "ctx": 16, "batch": 256, "buffer": 1024, "d_sae": 64, "layer": 0}
HEAD_ROWS = 1024


def streamed_finetune(model, tok, n: int, p: dict, folder: Path) -> dict:
    """One pass of ``train_sae`` over ``n`` streamed rows (``n // batch`` steps); returns its history's last entry."""
    from rsae.activations import extract_activations
    from rsae.saes import ReLUSAE
    from rsae.stream import StreamedActivations, stream_manifest
    from rsae.train import train_sae

    extract_activations(model, tok, layer=p["layer"], dataset="bbc-news", split="train", n_tokens=HEAD_ROWS,
                        out_dir=folder, ctx_len=p["ctx"], eval_fraction=0.02, device=bench_device(),
                        meta={"storage": stream_manifest(n, p["buffer"], 8, "stream")})  # fmt: skip
    store = StreamedActivations(folder, lambda: (model, tok), device=bench_device())
    sae = ReLUSAE(model.config.hidden_size, p["d_sae"])
    sae.init_weights(torch.Generator().manual_seed(0))
    hist = train_sae(sae, store, steps=n // p["batch"], batch_size=p["batch"], lr=1e-4, l1_coefficient=1e-3,
                     device=bench_device(), path="dense")  # fmt: skip
    return hist[-1]


def run(quick: bool = False) -> list[dict]:
    """All figures of benchmark 7; ``quick``: a few thousand tokens (seconds)."""
    from rsae.models import load_model

    p = QUICK if quick else FULL
    model, tok = load_model(MODEL, device=bench_device())
    out, resets = [], reset_peak()  # False: VmHWM cannot be reset here, each peak is the lifetime high-water mark
    with tempfile.TemporaryDirectory(prefix="rsae-bench-stream-") as d:  # warm-up: thread pools, allocator, text
        streamed_finetune(model, tok, p["buffer"] + p["batch"], p, Path(d))
    for n in p["tokens"]:
        with tempfile.TemporaryDirectory(prefix="rsae-bench-stream-") as d:
            t0 = time.perf_counter()
            last, peak, above = peak_during(lambda n=n, d=d: streamed_finetune(model, tok, n, p, Path(d)))
            wall = time.perf_counter() - t0
        params = {"tokens": n, "buffer_rows": p["buffer"], "batch": p["batch"], "d_sae": p["d_sae"], "ctx": p["ctx"]}
        out.append(figure(BENCH, "stream_peak_rss_bytes", above, "bytes", process_peak_bytes=peak,
                          peak_reset=resets, **params))  # fmt: skip
        out.append(figure(BENCH, "stream_tokens_per_s", n / wall, "tokens/s", wall_s=wall,
                          final_mse=last["mse"], **params))  # fmt: skip
    sizes = [f for f in out if f["name"] == "stream_peak_rss_bytes" and f["value"]]
    if len(sizes) == 2:
        out.append(figure(BENCH, "stream_peak_rss_ratio", sizes[1]["value"] / sizes[0]["value"], "x",
                          tokens=f"{sizes[1]['tokens']} vs {sizes[0]['tokens']}"))  # fmt: skip
        out.append(figure(BENCH, "stream_process_peak_ratio",
                          sizes[1]["process_peak_bytes"] / sizes[0]["process_peak_bytes"], "x",
                          tokens=f"{sizes[1]['tokens']} vs {sizes[0]['tokens']}"))  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: print one JSON line per figure (:func:`bench.common.quick_cli`)."""
    quick_cli(run, __doc__, argv)


if __name__ == "__main__":
    main()

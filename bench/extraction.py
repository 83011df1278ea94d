"""Benchmark 2, extraction: our truncated forward (``rsae.activations.ResidualCapture``, which stops the model
after block L) vs a full forward of the model capturing the same residual, and vs SAELens's
``ActivationsStore.get_activations`` on the same model (wrapped in SAELens's ``HookedProxyLM``), at layers 3, 5
and 15 of the bundled SmolLM2-135M (float32 on CPU, bfloat16 on CUDA) on the bundled BBC News text: tokens/s,
interleaved, medians. Then peak RSS of the whole ``rsae.activations.extract_activations`` (tokenise, forward,
shards to disk) at 100k and at 1M tokens.

    .venv/bin/python bench/extraction.py [--quick]
"""

from __future__ import annotations

import itertools
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

try:
    from bench.common import bench_device, device_sync, figure, interleaved, peak_during, quick_cli
except ModuleNotFoundError:  # run as a script
    from common import bench_device, device_sync, figure, interleaved, peak_during, quick_cli  # type: ignore[no-redef]

import torch

BENCH = "extraction"
MODEL = "smollm2-135m"
FULL = {"layers": (3, 5, 15), "seqs": 8, "ctx": 128, "rounds": 5, "rss_tokens": (100_000, 1_000_000), "rss_ctx": 128}
QUICK = {"layers": (3,), "seqs": 1, "ctx": 16, "rounds": 2, "rss_tokens": (240, 960), "rss_ctx": 16}


def token_batch(tok, seqs: int, ctx: int) -> torch.Tensor:
    """``seqs`` sequences of ``ctx`` BBC News tokens [seqs, ctx] (train split; ``rsae.data.iter_sequences``)."""
    from rsae.data import iter_sequences

    it = iter_sequences(tok, "bbc-news", "train", ctx_len=ctx, eval_fraction=0.2, seed=0)
    return torch.tensor([ids for ids, _ in itertools.islice(it, seqs)], dtype=torch.long)


def saelens_store(model, tok, layer: int, ids: torch.Tensor) -> tuple[Callable[[], Any] | None, str | None]:
    """SAELens's peer: a call of ``ActivationsStore.get_activations(ids)`` with the model wrapped in
    ``HookedProxyLM`` (hook ``model.layers.{layer}``), or (None, why) when SAELens cannot run it here."""
    try:
        from datasets import Dataset
        from sae_lens.load_model import HookedProxyLM
        from sae_lens.training.activations_store import ActivationsStore

        hook = f"model.layers.{layer}"
        proxy = HookedProxyLM(model, tok, hook_names=[hook])
        store = ActivationsStore(
            model=proxy,
            dataset=Dataset.from_dict({"input_ids": ids.tolist()}),
            streaming=False,
            hook_name=hook,
            hook_head_index=None,
            context_size=ids.shape[1],
            d_in=model.config.hidden_size,
            n_batches_in_buffer=2,
            total_training_tokens=ids.numel(),
            store_batch_size_prompts=ids.shape[0],
            train_batch_size_tokens=ids.numel(),
            prepend_bos=False,
            normalize_activations="none",
            device=torch.device(bench_device()),
            dtype="float32",
        )
        store.get_activations(ids)  # proves it runs
        return (lambda: store.get_activations(ids)), None
    except Exception as e:  # noqa: BLE001 - reported as the reason the peer is absent
        return None, f"{type(e).__name__}: {str(e)[:200]}"


def forward_figures(model, tok, p: dict) -> list[dict]:
    """Truncated vs full forward (vs SAELens's store) tokens/s at each layer of ``p["layers"]``."""
    ids = token_batch(tok, p["seqs"], p["ctx"]).to(bench_device())
    out: list[dict] = []
    for layer in p["layers"]:
        peers: dict[str, Callable[[], Any]] = {}  # each call registers its own hook: the two never fire together
        peers["truncated"] = lambda layer=layer: _capture(model, layer, ids, stop=True)
        peers["full"] = lambda layer=layer: _capture(model, layer, ids, stop=False)
        sl, why = saelens_store(model, tok, layer, ids)
        if sl is not None:
            peers["saelens_store"] = sl
        t = interleaved(peers, rounds=p["rounds"], warmup=1, sync=device_sync())
        info = {"layer": layer, "tokens_per_call": ids.numel(), "n_layers": model.config.num_hidden_layers}
        info |= {"device": bench_device(), "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
        for n, r in t.items():
            out.append(figure(BENCH, "tokens_per_s", ids.numel() / r["wall_s"], "tokens/s", peer=n, **info))
        out.append(figure(BENCH, "speedup_truncated_vs_full", t["full"]["wall_s"] / t["truncated"]["wall_s"], "x",
                          **info))  # fmt: skip
        if sl is None:
            out.append(figure(BENCH, "tokens_per_s", None, "tokens/s", peer="saelens_store", skipped=why, **info))
        else:
            ratio = t["saelens_store"]["wall_s"] / t["truncated"]["wall_s"]
            out.append(figure(BENCH, "speedup_truncated_vs_saelens_store", ratio, "x", **info))
    return out


def _capture(model, layer: int, ids: torch.Tensor, *, stop: bool) -> torch.Tensor:
    """The residual after block ``layer`` [b, T, d] by a forward that stops there (``stop``) or runs to the end."""
    from rsae.activations import ResidualCapture

    with ResidualCapture(model, layer, stop=stop) as cap:
        return cap.run(model, ids)


def rss_figures(model, tok, p: dict) -> list[dict]:
    """Peak RSS above the RSS before it, and wall time, of ``extract_activations`` at each of ``p["rss_tokens"]``
    (layer 3, shards in a temporary folder; 2% of documents held out so that 1M training tokens exist)."""
    from rsae.activations import extract_activations

    out = []
    for n in p["rss_tokens"]:
        with tempfile.TemporaryDirectory(prefix="rsae-bench-extract-") as d:
            t0 = time.perf_counter()

            def go(d=d, n=n):
                return extract_activations(model, tok, layer=3, dataset="bbc-news", split="train", n_tokens=n,
                                           out_dir=Path(d), ctx_len=p["rss_ctx"], eval_fraction=0.02,
                                           device=bench_device())  # fmt: skip

            try:
                _, peak, above = peak_during(go)
            except Exception as e:  # noqa: BLE001 - e.g. fewer tokens than asked: reported, not fatal
                out.append(figure(BENCH, "extract_peak_rss_bytes", None, "bytes", tokens=n, skipped=str(e)[:200]))
                continue
            wall = time.perf_counter() - t0
        out.append(figure(BENCH, "extract_peak_rss_bytes", above, "bytes", tokens=n, process_peak_bytes=peak))
        out.append(figure(BENCH, "extract_tokens_per_s", n / wall, "tokens/s", tokens=n, wall_s=wall))
    sizes = [f for f in out if f["name"] == "extract_peak_rss_bytes" and f["value"]]
    if len(sizes) == 2:
        out.append(figure(BENCH, "extract_peak_rss_ratio", sizes[1]["value"] / sizes[0]["value"], "x",
                          tokens=f"{sizes[1]['tokens']} vs {sizes[0]['tokens']}"))  # fmt: skip
    return out


def run(quick: bool = False) -> list[dict]:
    """All figures of benchmark 2; ``quick``: one or two tiny batches, a few thousand tokens (seconds)."""
    from rsae.models import load_model

    p = QUICK if quick else FULL
    model, tok = load_model(MODEL, device=bench_device())
    if bench_device().startswith("cuda"):  # the GPU run's host model is bfloat16 (bench/gpu.sh)
        model = model.to(torch.bfloat16)
    return forward_figures(model, tok, p) + rss_figures(model, tok, p)


def main(argv: list[str] | None = None) -> None:
    """Command line: print one JSON line per figure (:func:`bench.common.quick_cli`)."""
    quick_cli(run, __doc__, argv)


if __name__ == "__main__":
    main()

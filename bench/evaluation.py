"""Benchmark 4, evaluation: wall time of the evaluate stage per SAE column, and what dominates it; the downstream
(spliced CE/KL) metrics with the blocks below the hook cached vs recomputed, on the same input in the same run.

1. The evaluate stage of benchmark 3's default upgrade (:mod:`bench.upgrade`; one upgrade serves both in one
   process) runs under ``cProfile``. Figures: the stage's wall time (from the report's ``timings_s``), per SAE
   column (teacher, rsae_init, rsae, control), its share of the job; the cumulative time of its parts (spliced
   CE/KL forwards, reconstruction metrics, probing, the gate plot, all host-model forwards with their count) and
   the five functions with the most self time.
2. :func:`rsae.evaluate.downstream_metrics` on SmolLM2-135M, 8 BBC News held-out sequences of 128 tokens (one
   batch of 8, as the default job's batches), 4 SAE columns (random ReLU SAEs 576 -> 2,304: the time does not
   depend on the weights), at
   ``blocks.3.hook_resid_post`` (the default job's site) and ``blocks.15.hook_resid_post`` (mid-depth), twice
   each, interleaved: ``recompute`` (every splice a full forward, as before) and ``cached`` (one clean forward
   per batch; the zero and SAE splices replay the blocks below the site, :class:`rsae.hooks.LowerBlocks`).
   Figures: wall seconds per SAE column of each, the ratio cached / recompute, and the bound on what calling the
   upper blocks directly (design (a) of docs/performance.md) could save on top: the base model's forward with
   every block replayed (embeddings, rotary tables, masks, final norm), per spliced forward.

    .venv/bin/python bench/evaluation.py [--quick]
"""

from __future__ import annotations

try:
    from bench import upgrade
    from bench.common import bench_device, device_sync, figure, interleaved, quick_cli
except ModuleNotFoundError:  # run as a script
    import upgrade  # type: ignore[no-redef]
    from common import bench_device, device_sync, figure, interleaved, quick_cli  # type: ignore[no-redef]

BENCH = "evaluation"
COLUMNS = 4
FULL = {"sequences": 8, "ctx_len": 128, "d_sae": 2304, "layers": (3, 15), "rounds": 2}
QUICK = {"sequences": 2, "ctx_len": 16, "d_sae": 128, "layers": (3,), "rounds": 1}


def run(quick: bool = False) -> list[dict]:
    """All figures of benchmark 4 (runs benchmark 3's upgrade unless this process already did)."""
    return upgrade.measured(quick, None)[1] + splice_paths(quick)  # the same cache key as upgrade.run(quick)


def splice_paths(quick: bool = False) -> list[dict]:
    """Part 2 of the module docstring: cached vs recomputed lower blocks, interleaved, on the same sequences."""
    import torch

    from rsae.data import iter_sequences
    from rsae.evaluate import downstream_metrics
    from rsae.models import load_model
    from rsae.saes import ReLUSAE

    p, dev = QUICK if quick else FULL, bench_device()
    model, tok = load_model("smollm2-135m", device=dev)
    seqs = iter_sequences(tok, "bbc-news", "eval", ctx_len=p["ctx_len"], eval_fraction=0.2, seed=0)
    ids = torch.tensor([next(seqs)[0] for _ in range(p["sequences"])])
    saes = {}
    for i in range(COLUMNS):
        sae = ReLUSAE(model.config.hidden_size, p["d_sae"])
        sae.init_weights(torch.Generator().manual_seed(i))
        saes[f"sae{i}"] = sae.to(dev).eval()
    out = []
    for layer in p["layers"]:
        info = {"layer": layer, "hook": f"blocks.{layer}.hook_resid_post", "sequences": p["sequences"],
                "ctx_len": p["ctx_len"], "batch_size": 8, "columns": COLUMNS, "device": dev}  # fmt: skip

        def call(reuse: bool, layer: int = layer):
            return lambda: downstream_metrics(
                model, layer, saes, ids, batch_size=8, device=dev, reuse_lower_blocks=reuse
            )

        res = interleaved({"recompute": call(False), "cached": call(True)}, rounds=p["rounds"], warmup=0,
                          sync=device_sync())  # fmt: skip
        for name, r in res.items():
            out.append(figure(BENCH, "downstream_s_per_column", r["wall_s"] / COLUMNS, "s", path=name,
                              walls=r["walls"], cpu_s=r["cpu_s"] / COLUMNS, **info))  # fmt: skip
        ratio = res["cached"]["wall_s"] / res["recompute"]["wall_s"]
        out.append(figure(BENCH, "downstream_cached_over_recompute", ratio, "x", **info))
        out.append(_design_a_bound(model, ids[:8].to(dev), layer, info))
    return out


def _design_a_bound(model, ids, layer: int, info: dict) -> dict:
    """Seconds per spliced forward that calling the upper blocks directly could save over replaying: the base
    model's forward (no LM head) with every block replayed, median of 3, beside a cached spliced forward."""
    import statistics
    import time

    import torch

    from rsae.hooks import LowerBlocks, site_for
    from rsae.models import decoder_layers

    n = len(decoder_layers(model))
    every = LowerBlocks(model, site_for(model, hook=f"blocks.{n - 1}.hook_resid_post"))
    at = LowerBlocks(model, site_for(model, hook=f"blocks.{layer}.hook_resid_post"))
    sync = device_sync()

    def timed(fn) -> float:
        walls = []
        for _ in range(3):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            walls.append(time.perf_counter() - t0)
        return statistics.median(walls)

    with torch.no_grad():
        every.record(model, ids)
        at.record(model, ids)
        with every:
            skeleton = timed(lambda: model.model(input_ids=ids, use_cache=False))
        with at:
            spliced = timed(lambda: model(input_ids=ids, use_cache=False))
    return figure(BENCH, "design_a_bound_s_per_forward", skeleton, "s", spliced_forward_s=spliced,
                  share=skeleton / spliced, **{**info, "sequences": ids.shape[0]})  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Command line: print one JSON line per figure (:func:`bench.common.quick_cli`)."""
    quick_cli(run, __doc__, argv)


if __name__ == "__main__":
    main()

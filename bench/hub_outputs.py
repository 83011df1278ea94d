"""Cost of the package stage's hub-ready outputs (``rsae.pipeline.outputs.write_hub_outputs``) per SAE.

Times, for a ReLU SAE with random weights on random activations (the cost does not depend on the values):
``core_statistics`` (one pass over the held-out rows), ``weight_statistics`` (per-latent weight metrics, the
max cosine similarities being O(d_sae^2 d_in)), and building + serialising the SAEBench result with one
entry per latent; reports the JSON's size. The package stage runs the first two for the RSAE, the teacher
and the control (three SAEs).

    .venv/bin/python bench/hub_outputs.py                 # d_in 576, d_sae 2304 and 16384, 8192 held-out rows
    .venv/bin/python bench/hub_outputs.py --quick         # d_sae 512, 2048 rows: seconds
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from rsae.evaluate import core_statistics
from rsae.saebench import CoreEvalConfig, core_eval_output, weight_statistics
from rsae.saes import ReLUSAE


def run(d_in: int, d_sae: int, rows: int) -> dict[str, float]:
    """Seconds of each part and the JSON size (MB) for one SAE of ``d_in`` x ``d_sae`` on ``rows`` rows."""
    g = torch.Generator().manual_seed(0)
    sae = ReLUSAE(d_in, d_sae)
    sae.init_weights(g)
    x = torch.randn(rows, d_in, generator=g)
    t0 = time.perf_counter()
    stats = core_statistics(sae, x.split(2048), rows_per_sequence=127)
    t1 = time.perf_counter()
    weights = weight_statistics(sae)
    t2 = time.perf_counter()
    metrics = {"mse": 1.0, "fvu": 0.3, "l0": 50.0}
    out = core_eval_output(
        metrics=metrics,
        stats=stats,
        weights=weights,
        eval_config=CoreEvalConfig(),
        sae_cfg_dict=sae.cfg_dict(),
        sae_lens_version=None,
        computed_by="bench",
    )
    text = json.dumps(out.model_dump(mode="json"), indent=2)
    t3 = time.perf_counter()
    return {
        "core_statistics_s": t1 - t0,
        "weight_statistics_s": t2 - t1,
        "saebench_json_s": t3 - t2,
        "json_mb": len(text) / 1e6,
    }


def main() -> None:
    """Print one line per size."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--d-sae", type=int, nargs="+", default=[2304, 16384])
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--quick", action="store_true", help="d_sae 512, 2048 rows")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    sizes, rows = ([512], 2048) if a.quick else (a.d_sae, a.rows)
    print(f"d_in {a.d_in}, {rows} rows, {torch.get_num_threads()} threads")
    for d_sae in sizes:
        r = run(a.d_in, d_sae, rows)
        print(f"d_sae {d_sae:>6}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()))


if __name__ == "__main__":
    main()

"""Benchmark 6, scaling: the RSAE's fine-tuning step (ReLU teacher, exact-zero floor) and SAELens's step vs d_sae
(2k to 32k) and batch, with the dense GEMM roofline timed beside them, to see where the step departs from
GEMM-bound.

Same peers and method as benchmark 1 (:mod:`bench.finetune_step`: interleaved medians, VmHWM peaks); per
(batch, d_sae) it adds ``overhead_over_gemm`` = step seconds / seconds of the step's 5 dense GEMMs: 1 is
GEMM-bound, larger means element-wise work (gate, loss, Adam over d_in x d_sae weights, bookkeeping) or memory
traffic costs as much as the GEMMs; ``peak_rss_per_h`` = the step's peak RSS / one [batch, d_sae] float32 tensor.

    .venv/bin/python bench/scaling.py [--quick]
"""

from __future__ import annotations

try:
    from bench import finetune_step
    from bench.common import quick_cli
except ModuleNotFoundError:  # run as a script
    import finetune_step  # type: ignore[no-redef]
    from common import quick_cli  # type: ignore[no-redef]

BENCH = "scaling"
FULL = {"d_in": 576, "d_sae": (2048, 4096, 8192, 16384, 32768), "batch": (1024, 4096), "l0": 48, "rounds": 3}
QUICK = {"d_in": 64, "d_sae": (128, 512), "batch": (64, 256), "l0": 8, "rounds": 2}


def run(quick: bool = False) -> list[dict]:
    """All figures of benchmark 6; ``quick``: tiny sizes, seconds."""
    p = {**(QUICK if quick else FULL), "warmup": 1}
    out: list[dict] = []
    for batch in p["batch"]:
        x = finetune_step.activations(batch, p["d_in"])
        for d_sae in p["d_sae"]:
            figs = finetune_step._one("relu", x, d_sae, p)
            roof = next(f["value"] for f in figs if f["name"] == "roofline_tokens_per_s")
            for f in figs:
                f = {**f, "bench": BENCH}
                out.append(f)
                if f["name"] == "tokens_per_s":
                    h_bytes = 4 * batch * d_sae
                    extra = {k: f[k] for k in ("peer", "batch", "d_sae", "d_in")}
                    out.append(finetune_step.figure(BENCH, "step_s", f["step_s"], "s", **extra))
                    out.append(finetune_step.figure(BENCH, "overhead_over_gemm", roof / f["value"], "x", **extra))
                    out.append(
                        finetune_step.figure(BENCH, "peak_rss_per_h", f["peak_rss_bytes"] / h_bytes, "x h", **extra)
                    )
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: print one JSON line per figure (:func:`bench.common.quick_cli`)."""
    quick_cli(run, __doc__, argv)


if __name__ == "__main__":
    main()

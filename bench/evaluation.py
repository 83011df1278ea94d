"""Benchmark 4, evaluation: wall time of the evaluate stage per SAE column, and what dominates it.

The evaluate stage of benchmark 3's default upgrade (:mod:`bench.upgrade`; one upgrade serves both in one process)
runs under ``cProfile``. Figures: the stage's wall time (from the report's ``timings_s``), per SAE column (teacher,
rsae_init, rsae, control), its share of the job; the cumulative time of its parts (spliced CE/KL forwards,
reconstruction metrics, probing, the gate plot, all host-model forwards with their count) and the five functions
with the most self time.

    .venv/bin/python bench/evaluation.py [--quick]
"""

from __future__ import annotations

import argparse
import json

try:
    from bench import upgrade
except ModuleNotFoundError:  # run as a script
    import upgrade  # type: ignore[no-redef]


def run(quick: bool = False) -> list[dict]:
    """All figures of benchmark 4 (runs benchmark 3's upgrade unless this process already did)."""
    return upgrade.measured(quick, None)[1]  # the same cache key as upgrade.run(quick)


def main(argv: list[str] | None = None) -> None:
    """Command line: print one JSON line per figure."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    for f in run(ap.parse_args(argv).quick):
        print(json.dumps(f))


if __name__ == "__main__":
    main()

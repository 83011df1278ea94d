"""Benchmark 4, evaluation: wall time of the evaluate stage per SAE column, and what dominates it.

The evaluate stage of benchmark 3's default upgrade (:mod:`bench.upgrade`; one upgrade serves both in one process)
runs under ``cProfile``. Figures: the stage's wall time (from the report's ``timings_s``), per SAE column (teacher,
rsae_init, rsae, control), its share of the job; the cumulative time of its parts (spliced CE/KL forwards,
reconstruction metrics, probing, the gate plot, all host-model forwards with their count) and the five functions
with the most self time.

    .venv/bin/python bench/evaluation.py [--quick]
"""

from __future__ import annotations

try:
    from bench import upgrade
    from bench.common import quick_cli
except ModuleNotFoundError:  # run as a script
    import upgrade  # type: ignore[no-redef]
    from common import quick_cli  # type: ignore[no-redef]


def run(quick: bool = False) -> list[dict]:
    """All figures of benchmark 4 (runs benchmark 3's upgrade unless this process already did)."""
    return upgrade.measured(quick, None)[1]  # the same cache key as upgrade.run(quick)


def main(argv: list[str] | None = None) -> None:
    """Command line: print one JSON line per figure (:func:`bench.common.quick_cli`)."""
    quick_cli(run, __doc__, argv)


if __name__ == "__main__":
    main()

"""Benchmarks of issue 14 (``bench/run_all.py`` runs them all; ``bench/README.md``)."""

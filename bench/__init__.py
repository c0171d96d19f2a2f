"""Benchmarks, run with ``make bench`` (results go to ``bench/results/``, which git ignores)."""

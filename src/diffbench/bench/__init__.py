"""Benchmarks for speed work: `python -m diffbench.bench train|eval|peers` (`cli/bench.py`)."""

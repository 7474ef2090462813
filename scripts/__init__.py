"""Benchmarks and comparisons built on the recipes (``python -m scripts.compare`` / ``kron-compare``)."""

"""Benchmarks: per-layer (layers.py); end-to-end ones live beside it."""

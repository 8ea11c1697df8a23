"""Benchmark scripts, run as modules from the repository root (``python -m benchmarks.throughput ...``); each prints
a table and writes ``benchmarks/results/<name>.json``. Tests import them as ``benchmarks.<name>``."""

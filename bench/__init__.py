"""Benchmarks, not tests: each prints what it measured and records it in BENCHMARKS.md."""

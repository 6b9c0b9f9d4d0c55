"""Benchmark scripts of hello_fast; each writes its results under benchmarks/results/."""

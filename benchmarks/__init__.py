"""Benchmarks: `make bench` runs the suite (benchmarks/suite); the bench_*.py scripts also run alone."""

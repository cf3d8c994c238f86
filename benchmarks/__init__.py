"""Benchmarks and the reproduction of the L2E paper's claims (run as ``python -m benchmarks.NAME``).

Every benchmark compares against a baseline measured in the same process, with paired,
interleaved runs (A, B, A, B, ...) and medians, prints a table for people and one JSON line
(prefixed ``BENCH_JSON``) for machines, and asserts its own correctness before posting a number.
"""

"""Benchmarks run by `make bench` (CPU) and `make bench-gpu`; each prints a table and writes JSON."""

"""Benchmarks and device scripts (run as modules from the repository root: ``python3 -m perf.<name>``)."""

"""Benchmarks and device scripts, run as modules from the repository root: ``python3 -m perf.<name>``
(``python3 -m perf.bench_hf_experts --json out.json``). Each measures what the library installed
(or this checkout, from its root) does; none imports ``tests``."""

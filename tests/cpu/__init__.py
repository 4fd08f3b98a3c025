"""CPU tests: sim backend, the Numba simulator, fakes of the GPU layer (tests/helpers)."""

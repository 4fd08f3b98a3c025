"""The test suite, tiered by hardware: cpu/ (any machine), gpu/ (marked gpu/multigpu; skip without), helpers/ (shared fakes and rank functions)."""

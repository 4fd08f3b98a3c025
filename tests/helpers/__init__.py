"""Test helpers shared by several test files (a fake CUDA runtime)."""

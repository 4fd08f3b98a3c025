"""GPU tests (marked gpu / multigpu): skip cleanly without a GPU (tests/conftest.py)."""

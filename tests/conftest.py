import os
import random

import pytest


@pytest.fixture
def seed() -> int:
    """A fresh seed per test: data differs from run to run (printed on failure)."""
    s = random.SystemRandom().randrange(2**31)
    print(f"seed={s}")
    return s


def pytest_collection_modifyitems(config, items):
    """GPU-marked tests skip cleanly where torch sees too few GPUs."""
    try:
        import torch
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        n = 0
    for item in items:
        if "multigpu" in item.keywords and n < 2:
            item.add_marker(pytest.mark.skip(reason=f"needs >= 2 CUDA GPUs, found {n}"))
        elif "gpu" in item.keywords and n < 1:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))

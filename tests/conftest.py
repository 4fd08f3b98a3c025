import importlib.util
import os
import random

import pytest


def _import_triton_for_its_interpreter() -> None:
    """Import triton with ``TRITON_INTERPRET=1`` on a machine without CUDA, then restore the variable.

    Triton decides at import time whether its own library functions (``tl.sum``, ``tl.cumsum``, ...)
    are interpreted; a process that imported it without the variable (torch or transformers may,
    in any earlier test) cannot run kernels in the interpreter later ("Cannot call @triton.jit'd
    outside of the scope of a kernel"). The library's own JIT functions are defined here too, for the
    same reason. dwdp_comm reads the variable at call time, so the CPU
    tests that run its kernels in the interpreter set it per test (a fixture) and every other test
    keeps its CPU paths.
    """
    if importlib.util.find_spec("triton") is None:
        return
    import torch
    if torch.cuda.is_available():  # GPU machines run the kernels compiled
        return
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
        # the library's JIT functions too: each takes its mode when defined, so a test that imports
        # their module with the variable unset (the PTX test once did) broke every later interpreter test
        import torch
        from dwdp_comm.kernels import triton_moe, triton_quant_kernels, triton_route_kernels  # noqa: F401
        triton_moe.unavailable_reason(torch.empty(1, dtype=torch.bfloat16))  # defines its kernels
    except Exception:  # a broken install: the tests that need it fail on their own
        pass
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


_import_triton_for_its_interpreter()


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

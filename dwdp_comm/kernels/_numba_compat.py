"""The one place that imports ``numba.cuda`` for dwdp_comm, with the numpy compatibility shim.

Why the shim: numba-cuda 0.30.x registers ``overload(np.row_stack)`` unguarded
(``numba/cuda/np/arrayobj.py``), and numpy 2.5 removed ``np.row_stack`` (deprecated since 2.0).
On such a numpy the first kernel compilation fails with
``AttributeError: module 'numpy' has no attribute 'row_stack'``. Aliasing the removed name to
``np.vstack`` (what it always was) before numba-cuda loads its typing is enough. The alias is only
added when the attribute is missing, so older numpy keeps its own (deprecated) function.

Import this module only when the Numba backend is chosen: it imports numba.
"""

from __future__ import annotations

import importlib
import warnings

import numpy as np

__all__ = ["import_numba_cuda", "unavailable_reason"]


def _shim_numpy() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        missing = not hasattr(np, "row_stack")
    if missing:
        np.row_stack = np.vstack  # numba-cuda 0.30 vs numpy >= 2.5, see the module docstring


def import_numba_cuda():
    """Return the ``numba.cuda`` module (the simulator when ``NUMBA_ENABLE_CUDASIM=1`` was set
    before numba was first imported), after applying the numpy shim."""
    _shim_numpy()
    return importlib.import_module("numba.cuda")


def unavailable_reason() -> str | None:
    """None when numba-cuda can run kernels here (a GPU, or the simulator), else why not."""
    try:
        cuda = import_numba_cuda()
    except ImportError as exc:
        return f"numba-cuda is not installed ({exc}); pip install numba numba-cuda"
    except Exception as exc:  # a broken install: say what it raised
        return f"importing numba.cuda failed: {type(exc).__name__}: {exc}"
    if is_simulator(cuda):
        return None
    try:
        ok = cuda.is_available()
    except Exception as exc:
        return f"numba.cuda.is_available() raised {type(exc).__name__}: {exc}"
    return None if ok else "numba.cuda sees no GPU (set NUMBA_ENABLE_CUDASIM=1 before importing numba to simulate)"


def is_simulator(cuda=None) -> bool:
    """True when numba.cuda is the CPU simulator (``NUMBA_ENABLE_CUDASIM=1``)."""
    cuda = cuda or import_numba_cuda()
    from numba import config
    return bool(getattr(config, "ENABLE_CUDASIM", False))

"""cuda.bindings, loaded on first use, and checked calls.

cuda.bindings calls return ``(err, *values)``; :func:`check` turns a non-success ``err`` into a
:class:`CudaError` naming the API and the ``cudaError_t`` / ``CUresult`` name. cuda.bindings is
imported on first use only (``import dwdp_comm`` needs no GPU package).
"""

from __future__ import annotations

import logging
from typing import Any

from ...errors import DwdpError
from ...interop import MissingDependencyError

__all__ = ["Bindings", "bindings", "bindings_reason", "load", "CudaError", "check", "set_device"]

log = logging.getLogger("dwdp_comm")


class Bindings:
    """The cuda.bindings modules in use: ``rt`` (runtime) and ``dr`` (driver), None until :func:`load`.
    Tests put a fake runtime in :data:`bindings` (tests/helpers/fake_cuda.py)."""

    __slots__ = ("rt", "dr")

    def __init__(self):
        self.rt = self.dr = None


bindings = Bindings()


def bindings_reason() -> str | None:
    """Why cuda.bindings cannot be used here (None when it imports)."""
    try:
        from cuda.bindings import driver, runtime  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return (f"cannot import cuda.bindings ({type(exc).__name__}: {exc}); install cuda-python "
                "(pip install 'cuda-python>=13,<14' for CUDA 13 drivers, '>=12.8,<13' for CUDA 12)")
    return None


def load():
    """``(cuda.bindings.runtime, cuda.bindings.driver)``, imported on first use."""
    if bindings.rt is None:
        reason = bindings_reason()
        if reason is not None:
            raise MissingDependencyError(reason)
        from cuda.bindings import driver, runtime
        bindings.rt, bindings.dr = runtime, driver
    return bindings.rt, bindings.dr


class CudaError(DwdpError, RuntimeError):
    """A CUDA runtime or driver call failed.

    Attributes
    ----------
    api : str
        The call, e.g. ``"cudaMemcpyAsync"``.
    code : int
        The ``cudaError_t`` / ``CUresult`` value; ``name`` is its name.
    """

    def __init__(self, api: str, err: Any, context: str = "", name: str | None = None):
        self.api = api
        self.code = int(err)
        self.name = name or getattr(err, "name", None) or str(err)
        self.context = context
        msg = f"{api} failed: {self.name} ({self.code})"
        super().__init__(msg + (f": {context}" if context else ""))

    def __reduce__(self):
        # Rebuilt from its fields, so that it crosses process boundaries (testing.launch's pipe).
        return (type(self), (self.api, self.code, self.context, self.name))


def check(result: Any, api: str, context: str = ""):
    """Unpack a cuda.bindings result tuple: raise :class:`CudaError` on failure, else return the
    value (None, one value, or a tuple of values)."""
    if isinstance(result, tuple):
        err, rest = result[0], result[1:]
    else:
        err, rest = result, ()
    if int(err) != 0:
        raise CudaError(api, err, context)
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


def set_device(index: int) -> None:
    """Make ``index`` current for cuda.bindings on this thread and create its primary context
    (driver-API calls such as cuMemCreate need a current context)."""
    rt, dr = load()
    check(dr.cuInit(0), "cuInit")
    check(rt.cudaSetDevice(index), "cudaSetDevice", f"device {index}")
    check(rt.cudaFree(0), "cudaFree(0)", "creating the primary context")

"""CuPy views (DLPack, zero copy) of what dwdp_comm returns, for programs written against CuPy.

A CuPy-only program needs nothing else from torch than the process group:

>>> import cupy as cp, dwdp_comm as dc
>>> from dwdp_comm.interop import cupy as dcp
>>> store.register(layer=0, name="w13", shard=cp_shard)        # CuPy array: read through __dlpack__
>>> s = cp.cuda.Stream(non_blocking=True)
>>> h = pf.prefetch(layer=0)
>>> h.wait(stream=s)                                                # CuPy streams are accepted anywhere
>>> w13 = dcp.weights(h, "w13")                                 # cupy.ndarray [num_experts, ...]
>>> with s: y = w13[e] @ x                                      # your kernels on s
>>> h.release(stream=s)

Streams: every ``stream=`` argument of the library takes a CuPy ``Stream`` (see
:func:`dwdp_comm.interop.streams.resolve_stream`). Events: ``handle.wait(stream=s)`` makes a CuPy
stream wait on the copy engine; ``handle.release(stream=s)`` records on it. :func:`stream_wait`
does the same for any event the library returns.

dtypes: CuPy has no bfloat16 / float8. Weights of such dtypes raise unless ``bits=True``, which
views them as unsigned integers of the same width (``uint16`` / ``uint8``), zero copy.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from . import MissingDependencyError
from ..errors import InvalidArgumentError, bad_type
from .streams import resolve_stream

__all__ = ["as_cupy", "weights", "local", "stream_wait", "cupy_stream"]

# torch dtypes CuPy cannot hold, and the same-width unsigned type used with bits=True.
_BITS = {torch.bfloat16: torch.uint16, torch.float8_e4m3fn: torch.uint8, torch.float8_e5m2: torch.uint8}
for _name in ("float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"):
    if hasattr(torch, _name):
        _BITS[getattr(torch, _name)] = torch.uint8


def _cupy():
    try:
        import cupy
    except ImportError as exc:
        raise MissingDependencyError(
            f"dwdp_comm.interop.cupy needs CuPy, which failed to import ({exc}); install the wheel for your "
            "CUDA (pip install cupy-cuda13x / cupy-cuda12x) or use the torch tensors the library returns") from exc
    return cupy


def as_cupy(tensor: Any, *, bits: bool = False):
    """A ``cupy.ndarray`` viewing ``tensor`` (same memory, shape, strides), zero copy.

    Parameters
    ----------
    tensor : torch.Tensor (CUDA) or any object with ``__dlpack__``
    bits : bool
        View dtypes CuPy lacks (bfloat16, float8) as ``uint16`` / ``uint8`` of the same shape.

    Raises
    ------
    MissingDependencyError
        CuPy is not installed.
    InvalidArgumentError
        The dtype has no CuPy equivalent and ``bits`` is False.
    """
    cp = _cupy()
    if isinstance(tensor, torch.Tensor):
        if tensor.dtype in _BITS:
            if not bits:
                raise InvalidArgumentError(
                    f"tensor: got dtype {tensor.dtype}, which CuPy cannot represent; pass bits=True to view it as "
                    f"{_BITS[tensor.dtype]} (same bytes)")
            tensor = tensor.view(_BITS[tensor.dtype])
        if tensor.dtype == torch.uint16:  # older torch cannot export uint16 through DLPack
            tensor_bits = tensor.view(torch.int16)
            return cp.from_dlpack(tensor_bits).view(cp.uint16)
        return cp.from_dlpack(tensor)
    if hasattr(tensor, "__dlpack__"):
        return cp.from_dlpack(tensor)
    raise bad_type("tensor", tensor, "a torch.Tensor or an object with __dlpack__")


def weights(handle, name: str, experts: Iterable[int] | None = None, *, bits: bool = False):
    """``handle.weights(name, experts)`` as a ``cupy.ndarray`` ``[num_experts, *expert_shape]``.

    Call ``handle.wait(stream=s)`` first, as for the torch view. Valid until ``handle.release()``.
    """
    return as_cupy(handle.weights(name, experts), bits=bits)


def local(store, layer: int, name: str, *, bits: bool = False):
    """This rank's shard in the heap, ``[num_local_experts, *expert_shape]``, as CuPy (zero copy)."""
    return as_cupy(store.local(layer, name), bits=bits)


def stream_wait(event, *, stream: Any = None) -> None:
    """Make ``stream`` (a CuPy stream, or anything :func:`resolve_stream` takes) wait for ``event``.

    ``event`` is a library event (e.g. a copy job's) or a :class:`~dwdp_comm.PrefetchHandle`.
    Never blocks the host.
    """
    event.wait(stream=stream)


def cupy_stream(stream: Any = None):
    """A CuPy ``ExternalStream`` for any stream the library accepts (None: the current torch stream)."""
    cp = _cupy()
    return cp.cuda.ExternalStream(resolve_stream(stream))

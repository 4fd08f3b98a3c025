"""Interop with the frameworks that hold the weights and run the kernels.

* :mod:`dwdp_comm.interop.streams`: :func:`resolve_stream`, the one place where a "stream" argument
  (torch, CuPy, cuda.core, ``__cuda_stream__`` objects, raw handles) becomes a ``cudaStream_t``.
* :mod:`dwdp_comm.interop.torch`: zero-copy torch views of device memory (``__cuda_array_interface__``
  / DLPack), used by the GPU backends for every heap, slot and composite view.
* :mod:`dwdp_comm.interop.cupy`: zero-copy CuPy views (DLPack) of what the library returns, so a
  CuPy-only program can register shards, prefetch, and read weights without touching torch tensors.

Nothing here imports CuPy or cuda.bindings at import time.
"""

from __future__ import annotations

from ..errors import MissingDependencyError

__all__ = ["MissingDependencyError", "resolve_stream"]


def __getattr__(name):  # lazy, so that ``import dwdp_comm.interop`` stays light
    if name == "resolve_stream":
        from .streams import resolve_stream
        return resolve_stream
    raise AttributeError(name)

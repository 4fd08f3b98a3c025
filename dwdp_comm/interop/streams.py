"""One stream-resolving helper for every API of the library that takes a ``stream``.

Accepted (checked in this order):

========================================  =====================================================
``None``                                  the current torch stream of the current device when
                                          torch has CUDA (``torch.cuda.current_stream()``), else
                                          ``0``: the CUDA default stream (the legacy NULL stream,
                                          or the per-thread stream for code built with
                                          per-thread default streams / cuda-python with
                                          ``CUDA_PYTHON_CUDA_PER_THREAD_DEFAULT_STREAM=1``).
                                          CuPy's default stream is the same legacy stream, so a
                                          CuPy-only program that never sets streams is ordered.
``int``                                   a raw ``cudaStream_t`` / ``CUstream`` value (>= 0).
``torch.cuda.Stream`` / ``ExternalStream`` its ``cuda_stream``.
an object with ``__cuda_stream__``        the CUDA stream protocol (cuda.core ``Stream``, CuPy
                                          >= 13, torch >= 2.6): a method (or, in early cuda.core
                                          releases, a property) returning ``(version, handle)``.
CuPy ``Stream`` / ``ExternalStream``      its ``ptr`` (CuPy without ``__cuda_stream__``).
cuda.bindings ``CUstream``/``cudaStream_t`` ``int(obj)``.
========================================  =====================================================

Anything else raises :class:`~dwdp_comm.errors.InvalidTypeError` naming the type.
"""

from __future__ import annotations

from typing import Any

from ..errors import bad_arg, bad_type

__all__ = ["resolve_stream", "ACCEPTED"]

ACCEPTED = ("None, an int (raw cudaStream_t), a torch.cuda.Stream, a CuPy Stream, a cuda.core Stream, "
            "an object with __cuda_stream__, or a cuda.bindings CUstream/cudaStream_t")


def _torch_current() -> int:
    try:
        import torch
    except ImportError:  # torch is a dependency, but keep the helper usable without it
        return 0
    if torch.cuda.is_available():
        return int(torch.cuda.current_stream().cuda_stream)
    return 0


def _from_protocol(stream: Any, attr: Any) -> int:
    got = attr() if callable(attr) else attr
    if not (isinstance(got, tuple) and len(got) == 2):
        raise bad_arg("stream", f"{type(stream).__name__}.__cuda_stream__ -> {got!r}",
                      "a (version, handle) tuple (the CUDA stream protocol)")
    version, handle = got
    if version != 0:
        raise bad_arg("stream", f"{type(stream).__name__}.__cuda_stream__ version {version!r}",
                      "version 0 of the CUDA stream protocol")
    return int(handle)


def resolve_stream(stream: Any = None) -> int:
    """The raw ``cudaStream_t`` (an int) that ``stream`` designates.

    Parameters
    ----------
    stream : None, int, torch.cuda.Stream, cupy.cuda.Stream, cuda.core.Stream or protocol object
        See the module docstring for what each means; ``None`` is the current torch stream.

    Returns
    -------
    int
        The stream handle (0 is the default stream).

    Raises
    ------
    InvalidTypeError
        ``stream`` is none of the accepted kinds (bools and floats included).
    InvalidArgumentError
        A negative int, or a ``__cuda_stream__`` that does not follow the protocol.
    """
    if stream is None:
        return _torch_current()
    if isinstance(stream, bool):
        raise bad_type("stream", stream, ACCEPTED)
    if isinstance(stream, int):
        if stream < 0:
            raise bad_arg("stream", stream, "a stream handle >= 0")
        return stream
    # torch first: its streams may also expose __cuda_stream__, but cuda_stream exists in every version.
    mod = type(stream).__module__ or ""
    if mod.startswith("torch") and hasattr(stream, "cuda_stream"):
        return int(stream.cuda_stream)
    attr = getattr(stream, "__cuda_stream__", None)
    if attr is not None:
        return _from_protocol(stream, attr)
    if mod.startswith("cupy") and hasattr(stream, "ptr"):
        return int(stream.ptr)
    if mod.startswith("cuda.bindings"):
        try:
            return int(stream)
        except (TypeError, ValueError):
            pass
    raise bad_type("stream", stream, ACCEPTED)

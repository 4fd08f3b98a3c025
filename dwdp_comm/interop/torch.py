"""Zero-copy torch views of device memory, and torch-side helpers.

The GPU backends make every heap, slot and composite view with :func:`tensor_from_ptr`: a small
holder object exposes ``__cuda_array_interface__`` and owns (a reference to) the memory;
``torch.as_tensor`` keeps the holder alive for as long as any view of the tensor lives, so memory
is never unmapped under a live tensor.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import DwdpError, bad_arg, bad_type
from .streams import resolve_stream

__all__ = ["tensor_from_ptr", "as_torch", "current_stream", "stream_wait", "resolve_stream"]


class _DeviceBytes:
    """``__cuda_array_interface__`` (v3) for ``nbytes`` bytes at ``ptr``; keeps ``owner`` alive."""

    __slots__ = ("_cai", "owner")

    def __init__(self, ptr: int, nbytes: int, owner: Any):
        # stream None: the producer asks for no synchronisation (ordering is the caller's, via events).
        self._cai = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "strides": None,
                     "version": 3, "stream": None}
        self.owner = owner

    @property
    def __cuda_array_interface__(self) -> dict:
        return self._cai


def tensor_from_ptr(ptr: int, nbytes: int, device: torch.device | int, owner: Any = None) -> torch.Tensor:
    """A ``uint8`` tensor ``[nbytes]`` over device memory at ``ptr``, zero copy.

    Parameters
    ----------
    ptr : int
        Device address (memory of ``device``, or mapped into its address space).
    nbytes : int
        Length in bytes (0 gives an empty tensor on ``device``).
    device : torch.device or int
        The CUDA device the tensor is reported on.
    owner : object, optional
        Kept alive by the tensor (and every view of it) until the last one is freed.

    Raises
    ------
    DwdpError
        torch did not view the memory in place (it would have copied it).
    """
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8, device=dev)
    t = torch.as_tensor(_DeviceBytes(int(ptr), int(nbytes), owner), device=dev)
    if t.data_ptr() != int(ptr) or t.device != dev:
        raise DwdpError(f"torch did not view device memory 0x{int(ptr):x} in place on {dev} "
                        f"(got 0x{t.data_ptr():x} on {t.device}); the pointer's device differs from {dev}")
    return t


def as_torch(x: Any, device: torch.device | None = None) -> torch.Tensor:
    """A torch tensor viewing ``x`` without copying.

    Parameters
    ----------
    x : torch.Tensor, or an object with ``__dlpack__`` (CuPy, cuda.core, NumPy, JAX, ...) or
        ``__cuda_array_interface__`` (Numba, older CuPy)
    device : torch.device, optional
        If given, the view must be on it (checked; never copied across devices).

    Raises
    ------
    InvalidTypeError
        ``x`` exposes neither protocol.
    InvalidArgumentError
        The view is not on ``device``.
    """
    if isinstance(x, torch.Tensor):
        t = x
    elif hasattr(x, "__dlpack__"):
        t = torch.from_dlpack(x)
    elif hasattr(x, "__cuda_array_interface__"):
        cai = x.__cuda_array_interface__
        t = torch.as_tensor(x, device="cuda")
        if t.data_ptr() != int(cai["data"][0]) and t.numel():
            raise DwdpError("torch copied a __cuda_array_interface__ object instead of viewing it")
    else:
        raise bad_type("x", x, "a torch.Tensor or an object with __dlpack__ or __cuda_array_interface__")
    if device is not None and t.device != torch.device(device):
        raise bad_arg("device", str(device), f"the device of x ({t.device}); as_torch never copies")
    return t


def current_stream() -> int:
    """The raw handle of the current torch stream (0 without torch CUDA)."""
    return resolve_stream(None)


def stream_wait(event: Any, *, stream: Any = None) -> None:
    """Make a torch stream (or any stream :func:`resolve_stream` takes; None: the current one) wait
    for a library event or a :class:`~dwdp_comm.PrefetchHandle`. Never blocks the host."""
    event.wait(stream=stream)

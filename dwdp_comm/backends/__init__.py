"""Heap backends, imported lazily so that ``import dwdp_comm`` needs no GPU package.

``BACKENDS`` lists them in the order ``auto`` prefers on a single host; across hosts ``auto`` skips
``cuda_ipc`` (CUDA IPC does not cross nodes). Each backend module has ``probe() -> str | None``
(None when usable here, else why not) and a backend class.
"""

from __future__ import annotations

import importlib

from ..errors import BackendUnavailableError, bad_arg

__all__ = ["BACKENDS", "VALID_BACKENDS", "probe", "create"]

BACKENDS = ("cuda_ipc", "nvshmem", "sim")
VALID_BACKENDS = ("auto",) + BACKENDS
_CLASSES = {"sim": ("sim", "SimBackend"), "cuda_ipc": ("cuda_ipc", "CudaIpcBackend"),
            "nvshmem": ("nvshmem", "NvshmemBackend")}


def check_name(name: object, argname: str = "backend") -> str:
    """Validate a backend name (``auto`` included); return it."""
    if name not in VALID_BACKENDS:
        raise bad_arg(argname, name, f"one of {list(VALID_BACKENDS)}")
    return name  # type: ignore[return-value]


def _module(name: str):
    mod, _ = _CLASSES[name]
    return importlib.import_module(f"{__name__}.{mod}")


def probe(name: str) -> str | None:
    """Why backend ``name`` cannot run in this process, or None when it can (imports lazily)."""
    check_name(name)
    try:
        mod = _module(name)
    except ImportError as exc:
        return f"cannot import its module: {exc}"
    return mod.probe()


def create(name: str, comm, **options):
    """Construct backend ``name`` for this rank (collective over ``comm``)."""
    reason = probe(name)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {reason}")
    mod = _module(name)
    return getattr(mod, _CLASSES[name][1])(comm, **options)

"""The peer-access check and the collective "every rank raises the same error" helpers."""

from __future__ import annotations

import os
import socket
from typing import Callable, Sequence

import torch

from ...errors import BackendUnavailableError, DwdpError, PeerAccessError, gathered_error
from .driver import check, load

__all__ = ["device_info", "visible_devices", "peer_access_problems", "raise_gathered", "agree", "check_peer_access"]


# ---- the peer-access check ------------------------------------------------------------------------
def _pci_bus_id(device: int) -> str:
    rt, _ = load()
    got = check(rt.cudaDeviceGetPCIBusId(64, device), "cudaDeviceGetPCIBusId")
    if isinstance(got, (bytes, bytearray)):
        got = bytes(got).split(b"\0", 1)[0].decode("ascii", "replace")
    return str(got).split("\0", 1)[0].strip().lower()


def device_info(device: int) -> dict:
    """What peers need to know about this rank's GPU."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "device": device, "pci": _pci_bus_id(device),
            "name": torch.cuda.get_device_name(device)}


def visible_devices() -> dict[str, int]:
    """PCI bus id -> device ordinal of every GPU this process sees."""
    rt, _ = load()
    count = check(rt.cudaGetDeviceCount(), "cudaGetDeviceCount")
    return {_pci_bus_id(d): d for d in range(int(count))}


def peer_access_problems(infos: list[dict], rank: int, visible: dict[str, int],
                         can_access: Callable[[int, int], bool]) -> list[str]:
    """Pairs (this rank reading a peer on the same host) whose GPUs cannot access each other.

    Pure function (no CUDA): ``can_access(my_device, peer_device)`` is the oracle. A peer GPU this
    process cannot see (``CUDA_VISIBLE_DEVICES``) is not checked here; opening its handle is.
    """
    me = infos[rank]
    out = []
    for r, other in enumerate(infos):
        if r == rank or other["host"] != me["host"] or other["pci"] == me["pci"]:
            continue  # other hosts are the backend's business; the same GPU needs no peer access
        peer_dev = visible.get(other["pci"])
        if peer_dev is None:
            continue
        if not can_access(me["device"], peer_dev):
            out.append(f"rank {rank} (GPU {me['device']}, {me['pci']}) cannot access the memory of rank {r} "
                       f"(GPU {peer_dev}, {other['pci']})")
    return out


def raise_gathered(errors: Sequence[str | None], what: str, exc_type=BackendUnavailableError, hint: str = "") -> None:
    """Raise ``exc_type`` listing every rank's error if any entry of the gathered ``errors`` is set
    (every rank holds the same list, so every rank raises the same error). Built by
    :func:`dwdp_comm.errors.gathered_error`, the library's one builder of agreed errors."""
    err = gathered_error(errors, what, exc_type, hint)
    if err is not None:
        raise err


def agree(comm, error: str | None, what: str, exc_type=BackendUnavailableError, hint: str = "") -> None:
    """Collective: raise ``exc_type`` on every rank, listing every rank's error, if any rank has one
    (:meth:`dwdp_comm.comm.Comm.agree` with this module's default error class)."""
    comm.agree(error, what, exc_type, hint)


def check_peer_access(comm, infos: list[dict], backend: str, alternatives: str) -> None:
    """Collective: raise :class:`PeerAccessError` on every rank, naming every pair of GPUs (on one
    host) without peer access."""
    rt, _ = load()

    def can(a: int, b: int) -> bool:
        return bool(check(rt.cudaDeviceCanAccessPeer(a, b), "cudaDeviceCanAccessPeer", f"GPU {a} -> GPU {b}"))

    try:
        problems = peer_access_problems(infos, comm.rank, visible_devices(), can)
        mine = "; ".join(problems) or None
    except DwdpError as exc:
        mine = f"checking peer access failed: {exc}"
    agree(comm, mine, f"backend {backend!r}: the peer-access check", PeerAccessError,
          f"{backend} reads peers' memory directly, which needs peer access (NVLink or PCIe P2P) between every "
          f"pair of GPUs of the group; use {alternatives} instead")

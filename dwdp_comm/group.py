"""Group bootstrap: a DWDP group on top of an existing torch.distributed process group."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import torch
import torch.distributed as dist

from . import backends as _backends
from .errors import BackendUnavailableError, ClosedError, CollectiveMismatchError, DwdpError

__all__ = ["Comm", "Group", "init", "ENV_BACKEND"]

log = logging.getLogger("dwdp_comm")
ENV_BACKEND = "DWDP_COMM_BACKEND"


class Comm:
    """Object exchange over a CPU-capable (gloo) process group; what backends and stores use.

    Every method is collective over the group. A rank that never arrives makes the others fail
    after the process group's timeout (``init_process_group(timeout=...)``), never hang forever.
    """

    def __init__(self, pg, rank: int, size: int):
        self.pg, self.rank, self.size = pg, rank, size

    def all_gather_object(self, obj: Any) -> list:
        """Collective: every rank's ``obj`` (picklable), in rank order."""
        out: list = [None] * self.size
        dist.all_gather_object(out, obj, group=self.pg)
        return out

    def barrier(self) -> None:
        """Collective: return once every rank arrived."""
        dist.barrier(group=self.pg)

    def agree(self, error: str | None, what: str) -> None:
        """Collective: raise :class:`CollectiveMismatchError` on every rank if any rank has an error.

        Parameters
        ----------
        error : str or None
            This rank's problem, or None.
        what : str
            The operation, for the message.
        """
        errors = self.all_gather_object(error)
        bad = [(r, e) for r, e in enumerate(errors) if e is not None]
        if bad:
            lines = "\n".join(f"  rank {r}: {e}" for r, e in bad)
            raise CollectiveMismatchError(f"{what} failed on {len(bad)} of {self.size} ranks:\n{lines}")


def _cpu_group(pg):
    """The process group itself when it can carry CPU objects, else a gloo group of the same ranks."""
    if "gloo" in str(dist.get_backend(pg)).lower():
        return pg
    # Collective over the default group: torch requires every process to call new_group.
    return dist.new_group(ranks=dist.get_process_group_ranks(pg), backend="gloo")


class Group:
    """A DWDP group: one rank per process, a heap backend, and the object exchange.

    Made by :func:`init`. ``close()`` is local; use the group as a context manager to close it on
    exit.

    Attributes
    ----------
    rank, size : int
        This rank and the number of ranks, within the process group given to :func:`init`.
    device : torch.device
        Where heap tensors live (``cpu`` on ``sim``, this rank's GPU otherwise).
    backend : str
        The heap backend in use: ``"sim"``, ``"cuda_ipc"`` or ``"nvshmem"``.
    backend_reason : str
        Why it was chosen: ``"requested"``, or for ``auto`` the candidates and why the ones
        before it were skipped.
    """

    def __init__(self, comm: Comm, backend_impl, reason: str):
        self.comm = comm
        self.rank, self.size = comm.rank, comm.size
        self.impl = backend_impl
        self.backend: str = backend_impl.name
        self.backend_reason = reason
        self.device: torch.device = backend_impl.device
        self._stores: list = []
        self._closed = False

    def check_open(self) -> None:
        """Raise :class:`ClosedError` if the group was closed."""
        if self._closed:
            raise ClosedError("group used after close()")

    def barrier(self) -> None:
        """Collective: block the host until every rank of the group called it."""
        self.check_open()
        self.comm.barrier()

    def close(self) -> None:
        """Release the backend. Stores still open are reported (a leak) and closed first."""
        if self._closed:
            raise ClosedError("group closed twice")
        open_stores = [s for s in self._stores if not s.closed]
        if open_stores:
            log.warning("dwdp_comm: group.close() with %d open WeightStore(s); closing them",
                        len(open_stores))
            for s in open_stores:
                s.close()
        self._closed = True
        self.impl.close()

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def __enter__(self) -> "Group":
        return self

    def __exit__(self, *exc) -> None:
        if not self._closed:
            self.close()

    def __repr__(self) -> str:
        return f"Group(rank={self.rank}, size={self.size}, backend={self.backend!r}, device={self.device})"


def init(backend: str = "auto", group=None, **options) -> Group:
    """Create a DWDP group over a torch.distributed process group. Collective.

    Parameters
    ----------
    backend : {"auto", "cuda_ipc", "nvshmem", "sim"}
        Heap backend. ``auto`` takes the first of ``cuda_ipc`` (one host only), ``nvshmem``, ``sim``
        that every rank can run, and says which and why: an INFO record on the ``dwdp_comm``
        logger, and ``Group.backend`` / ``Group.backend_reason``. The environment variable
        ``DWDP_COMM_BACKEND``, when set, overrides this argument.
    group : torch.distributed.ProcessGroup, optional
        The ranks of the DWDP group (default: the default group). If it is not a gloo group, a gloo
        group over the same ranks is created for object exchange; that step is collective over the
        default group.
    **options
        Passed to the backend: ``sim``: ``copy_bandwidth`` (bytes/s the copy thread may move);
        ``cuda_ipc``: ``vmm`` (None: VMM when it works, else legacy IPC; True/False: force) and
        ``fail_open=(importer, owner)`` (fault injection, tests only).

    Returns
    -------
    Group

    Notes
    -----
    Collective: every rank of ``group`` calls it with the same ``backend``; it blocks the host
    until they all did (bounded by the process group's timeout).

    Raises
    ------
    InvalidArgumentError
        Unknown backend name, as argument or in ``DWDP_COMM_BACKEND`` (the message lists the
        valid ones).
    CollectiveMismatchError
        Ranks asked for different backends.
    DwdpError
        torch.distributed is not initialised.
    BackendUnavailableError
        The backend cannot run on some rank (every rank raises, naming the ranks and reasons).
    """
    env = os.environ.get(ENV_BACKEND)
    if env:
        _backends.check_name(env, argname=ENV_BACKEND)
        if env != backend:
            log.info("dwdp_comm: %s=%s overrides backend=%r", ENV_BACKEND, env, backend)
        backend = env
    else:
        _backends.check_name(backend)
    if not dist.is_available() or not dist.is_initialized():
        raise DwdpError("torch.distributed is not initialized: call torch.distributed.init_process_group() "
                        "first (torchrun only sets RANK/WORLD_SIZE/MASTER_ADDR; the script must still call it), "
                        "or run the function on spawned ranks with dwdp_comm.testing.launch")
    pg = group if group is not None else dist.group.WORLD
    comm = Comm(_cpu_group(pg), dist.get_rank(pg), dist.get_world_size(pg))

    # One exchange decides the backend: every rank's request, host and probe results.
    candidates = _backends.BACKENDS if backend == "auto" else (backend,)
    mine = {"request": backend, "host": socket.gethostname(),
            "probe": {name: _backends.probe(name) for name in candidates}}
    everyone = comm.all_gather_object(mine)
    requests = {r: m["request"] for r, m in enumerate(everyone)}
    if len(set(requests.values())) > 1:
        raise CollectiveMismatchError(f"ranks asked for different backends: {requests}")
    one_host = len({m["host"] for m in everyone}) == 1
    chosen, reason = _choose(backend, candidates, everyone, one_host)
    impl = _backends.create(chosen, comm, **options)
    log.info("dwdp_comm: rank %d/%d uses backend %r (%s)", comm.rank, comm.size, chosen, reason)
    return Group(comm, impl, reason)


def _choose(backend: str, candidates, everyone: list[dict], one_host: bool) -> tuple[str, str]:
    def failures(name):
        return {r: m["probe"][name] for r, m in enumerate(everyone) if m["probe"][name] is not None}

    if backend != "auto":
        bad = failures(backend)
        if bad:
            others = [b for b in _backends.BACKENDS if b != backend]
            detail = "; ".join(f"rank {r}: {why}" for r, why in sorted(bad.items()))
            raise BackendUnavailableError(f"backend {backend!r} is unavailable ({detail}); try one of {others} "
                                          f"or backend='auto'")
        return backend, "requested"
    skipped = []
    for name in candidates:
        if name == "cuda_ipc" and not one_host:
            skipped.append("cuda_ipc: the group spans several hosts")
            continue
        bad = failures(name)
        if not bad:
            why = "auto: first usable of " + ", ".join(candidates)
            return name, why + (f" ({'; '.join(skipped)})" if skipped else "")
        r, why = next(iter(sorted(bad.items())))
        skipped.append(f"{name}: rank {r}: {why}")
    raise BackendUnavailableError("no backend is usable on every rank: " + "; ".join(skipped))

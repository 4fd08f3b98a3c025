"""Group bootstrap: a DWDP group on top of an existing torch.distributed process group.

:func:`init` chooses the heap backend every rank can run and returns a :class:`Group`; the object
exchange under it (:class:`~dwdp_comm.comm.Comm`, every collective step of the library: named,
numbered, bounded by a timeout) lives in :mod:`dwdp_comm.comm`, below the backends.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import uuid

import torch
import torch.distributed as dist

from . import backends as _backends
from .comm import Comm, board_store, describe, resolve_timeout
from .errors import BackendUnavailableError, ClosedError, CollectiveMismatchError, DwdpError, TransportError, bad_type

__all__ = ["Group", "init", "ENV_BACKEND"]

log = logging.getLogger("dwdp_comm")
ENV_BACKEND = "DWDP_COMM_BACKEND"


def _cpu_group(pg, timeout_s: float):
    """A gloo group over the ranks of ``pg`` whose timeout is ``timeout_s`` (collective over those
    ranks only: the other ranks of the default group need not call it)."""
    return dist.new_group(ranks=dist.get_process_group_ranks(pg), backend="gloo",
                          timeout=datetime.timedelta(seconds=timeout_s), use_local_synchronization=True)


class Group:
    """A DWDP group: one rank per process, a heap backend, and the object exchange.

    Made by :func:`init`. ``close()`` is local on ``sim`` and ``cuda_ipc`` (unless stores are left
    open) and collective on ``nvshmem``; use the group as a context manager to close it on exit
    (:meth:`abort`, always local, when an exception unwinds).

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
        """Collective: block the host until every rank of the group called it (bounded by the
        group's timeout, see :func:`init`)."""
        self.check_open()
        self.comm.barrier("Group.barrier")

    def close(self) -> None:
        """Release the backend. Stores still open are reported (a leak) and closed first
        (collectively: every rank must then call it). A second call does nothing."""
        if self._closed:
            return
        open_stores = [s for s in self._stores if not s.closed]
        if open_stores:
            log.warning("dwdp_comm: group.close() with %d open WeightStore(s); closing them",
                        len(open_stores))
        try:
            for s in open_stores:
                s.close()
        finally:
            self._closed = True
            self.impl.close()

    def abort(self) -> None:
        """Release this rank's resources without any collective step (what ``__exit__`` does while an
        exception unwinds: the peers may be anywhere). Peers waiting for this rank in a collective
        step get a timeout or a transport error naming it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for s in self._stores:
            s.abort()
        try:
            self.impl.abort()
        except Exception as exc:  # local cleanup must not mask the exception being handled
            log.warning("dwdp_comm: closing the backend during abort failed: %r", exc)

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def __enter__(self) -> "Group":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()

    def __repr__(self) -> str:
        return f"Group(rank={self.rank}, size={self.size}, backend={self.backend!r}, device={self.device})"


def init(backend: str = "auto", group=None, *, timeout: float | None = None, store=None, **options) -> Group:
    """Create a DWDP group over a torch.distributed process group. Collective.

    Parameters
    ----------
    backend : {"auto", "cuda_ipc", "nvshmem", "sim"}
        Heap backend. ``auto`` takes the first of ``cuda_ipc`` (one host only), ``nvshmem``, ``sim``
        that every rank can run, and says which and why: an INFO record on the ``dwdp_comm``
        logger, and ``Group.backend`` / ``Group.backend_reason``. The environment variable
        ``DWDP_COMM_BACKEND``, when set, overrides this argument.
    group : torch.distributed.ProcessGroup, optional
        The ranks of the DWDP group (default: the default group). A gloo group over the same ranks
        is created for the object exchange (only those ranks call it).
    timeout : float, optional
        Seconds every collective step of the library (init, commit, close, collective engine
        steps, barriers) waits for every rank before raising
        :class:`~dwdp_comm.errors.CollectiveTimeoutError` naming the ranks that did not arrive.
        Default: the ``DWDP_COMM_TIMEOUT`` environment variable, else 300 s.
    store : torch.distributed.Store, optional
        Where ranks record their arrival at each step, so that a timeout or a dead peer is reported
        with the ranks that had not arrived: every rank must pass the same store (the one given to
        ``init_process_group(store=...)``, say; :func:`dwdp_comm.launch.launch` passes its
        ``FileStore``). Default: a ``TCPStore`` client of ``MASTER_ADDR:MASTER_PORT`` when both are
        set (torchrun, ``env://``), else none (the error then says the missing ranks are unknown).
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
    until they all did (bounded by ``timeout``).

    Raises
    ------
    InvalidArgumentError
        Unknown backend name, as argument or in ``DWDP_COMM_BACKEND`` (the message lists the
        valid ones); a bad ``timeout`` or ``DWDP_COMM_TIMEOUT``.
    InvalidTypeError
        ``store`` is not a ``torch.distributed.Store``.
    CollectiveMismatchError
        Ranks asked for different backends.
    DwdpError
        torch.distributed is not initialised.
    BackendUnavailableError
        The backend cannot run on some rank (every rank raises, naming the ranks and reasons).
    CollectiveTimeoutError, TransportError
        A rank did not arrive, or died.
    """
    env = os.environ.get(ENV_BACKEND)
    if env:
        _backends.check_name(env, argname=ENV_BACKEND)
        if env != backend:
            log.info("dwdp_comm: %s=%s overrides backend=%r", ENV_BACKEND, env, backend)
        backend = env
    else:
        _backends.check_name(backend)
    timeout_s = resolve_timeout(timeout)
    if store is not None and not isinstance(store, dist.Store):
        raise bad_type("store", store, "None or a torch.distributed.Store (FileStore, TCPStore, ...)")
    if not dist.is_available() or not dist.is_initialized():
        raise DwdpError("torch.distributed is not initialized: call torch.distributed.init_process_group() "
                        "first (torchrun only sets RANK/WORLD_SIZE/MASTER_ADDR; the script must still call it), "
                        "or run the function on spawned ranks with dwdp_comm.launch.launch")
    pg = group if group is not None else dist.group.WORLD
    try:
        cpu = _cpu_group(pg, timeout_s)
    except Exception as exc:
        raise TransportError(f"dwdp_comm.init on global rank {dist.get_rank()}: creating the gloo group failed: "
                             f"{describe(exc)}", "init: creating the gloo group", dist.get_rank(), None) from exc
    comm = Comm(cpu, dist.get_rank(cpu), dist.get_world_size(cpu), timeout_s, board_store(store, timeout_s))

    # One exchange decides the backend: every rank's request, host and probe results.
    candidates = _backends.BACKENDS if backend == "auto" else (backend,)
    mine = {"request": backend, "host": socket.gethostname(), "uid": uuid.uuid4().hex,
            "probe": {name: _backends.probe(name) for name in candidates}}
    everyone = comm.all_gather_object(mine, "init: choosing the backend")
    comm.start_board(everyone[0]["uid"])
    requests = {r: m["request"] for r, m in enumerate(everyone)}
    if len(set(requests.values())) > 1:
        raise CollectiveMismatchError(f"ranks asked for different backends: {requests}", "init: choosing the backend")
    one_host = len({m["host"] for m in everyone}) == 1
    chosen, reason = _choose(backend, candidates, everyone, one_host)
    impl, err, cause = None, None, None
    try:
        impl = _backends.create(chosen, comm, **options)
    except Exception as exc:
        err, cause = describe(exc), exc
    try:
        comm.agree(err, f"init: creating the {chosen!r} backend", cause=cause)
    except BaseException:
        if impl is not None:  # some ranks may have no backend to close with: release locally
            try:
                impl.abort()
            except Exception as exc:
                log.warning("dwdp_comm: releasing the backend after a failed init failed: %r", exc)
        raise
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

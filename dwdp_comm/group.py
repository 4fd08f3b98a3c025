"""Group bootstrap: a DWDP group on top of an existing torch.distributed process group.

Every collective step of the library goes through :class:`Comm`, which gives each one a name, a
timeout and a sequence number, so that a failure is reported the same way everywhere:

* a rank that fails locally inside a step: :meth:`Comm.agree` makes every rank raise the same
  :class:`~dwdp_comm.errors.CollectiveFailedError` naming it (one builder,
  :func:`~dwdp_comm.errors.gathered_error`, for every "all ranks raise the same error" path);
* ranks in different steps (one closing while the others commit): every rank raises
  :class:`~dwdp_comm.errors.CollectiveMismatchError` naming each rank's step;
* a rank that does not arrive within the timeout, or dies: the others raise
  :class:`~dwdp_comm.errors.CollectiveTimeoutError` / :class:`~dwdp_comm.errors.TransportError`
  naming the step and the ranks that had not arrived (an arrival board in the rendezvous store).
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import socket
import time
import uuid
from typing import Any

import torch
import torch.distributed as dist

from . import backends as _backends
from .errors import (BackendUnavailableError, ClosedError, CollectiveMismatchError, CollectiveTimeoutError, DwdpError,
                     TransportError, bad_arg, bad_type, gathered_error)

__all__ = ["Comm", "Group", "init", "resolve_timeout", "board_store", "ENV_BACKEND", "ENV_TIMEOUT", "DEFAULT_TIMEOUT_S"]

log = logging.getLogger("dwdp_comm")
ENV_BACKEND = "DWDP_COMM_BACKEND"
ENV_TIMEOUT = "DWDP_COMM_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0  # gloo's own default is 30 min: a stuck peer should be reported well before


def resolve_timeout(timeout: float | None = None) -> float:
    """Seconds a collective step waits for every rank: ``timeout`` if given, else the
    ``DWDP_COMM_TIMEOUT`` environment variable, else :data:`DEFAULT_TIMEOUT_S` (300 s)."""
    name, value = "timeout", timeout
    if timeout is None:
        env = os.environ.get(ENV_TIMEOUT)
        if not env:
            return DEFAULT_TIMEOUT_S
        name = ENV_TIMEOUT
        try:
            value = float(env)
        except ValueError:
            raise bad_arg(ENV_TIMEOUT, env, "a number of seconds > 0") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise bad_arg(name, value, "a number of seconds > 0")
    return float(value)


def board_store(store=None, timeout_s: float = DEFAULT_TIMEOUT_S):
    """The store the arrival board uses: ``store`` if given, else a ``torch.distributed.TCPStore``
    client of the rendezvous at ``MASTER_ADDR:MASTER_PORT`` when both are set (torchrun and the
    ``env://`` init method serve one there), else None (missing ranks are then reported as unknown).

    Local; never raises: the board is best effort, the collective steps work without it.
    """
    if store is not None:
        return store
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return None
    try:
        return dist.TCPStore(addr, int(port), is_master=False, wait_for_workers=False,
                             timeout=datetime.timedelta(seconds=min(timeout_s, 30.0)))
    except Exception as exc:
        log.info("dwdp_comm: no arrival board (cannot reach the store at %s:%s: %r); a timeout will not name "
                 "the missing ranks", addr, port, exc)
        return None


class Comm:
    """Object exchange over a gloo process group; what backends and stores use.

    Every method is collective over the group and takes the name of its ``step``. Each call waits at
    most ``timeout_s`` for every rank; the ranks check they are in the same step (same name, same
    sequence number) before any of them proceeds. Failures raise on every rank that notices them:

    * different steps: :class:`~dwdp_comm.errors.CollectiveMismatchError` naming each rank's step;
    * a rank late by more than ``timeout_s``: :class:`~dwdp_comm.errors.CollectiveTimeoutError`;
    * a peer that died or closed its connection: :class:`~dwdp_comm.errors.TransportError`.

    Both of the last name this rank, the step and the ranks that had not arrived (from an arrival
    board in the rendezvous store), wrap gloo's exception as ``__cause__``, and mark the Comm broken:
    any later step raises at once instead of waiting on a group that lost a rank.

    Attributes
    ----------
    rank, size : int
    timeout_s : float
    broken : str or None
        Why the transport is unusable (None while it works).
    """

    def __init__(self, pg, rank: int, size: int, timeout_s: float = DEFAULT_TIMEOUT_S, store=None):
        self.pg, self.rank, self.size = pg, rank, size
        self.timeout_s = float(timeout_s)
        self.broken: str | None = None
        self._store = store
        self._board: str | None = None  # arrival-board key prefix, agreed at init
        self._seq = 0

    # ---- the arrival board ----------------------------------------------------------------------
    def start_board(self, uid: str) -> None:
        """Start recording arrivals under ``uid`` (the same on every rank; from :func:`init`)."""
        self._board = f"dwdp_comm/arrivals/{uid}"

    def _arrive(self, seq: int) -> None:
        if self._store is not None and self._board is not None:
            try:
                self._store.set(f"{self._board}/{self.rank}", str(seq))
            except Exception:
                self._store = None  # the board is best effort; the collective itself still runs

    def _missing(self, seq: int) -> list[int] | None:
        """Ranks whose last arrival is before step ``seq`` (None: unknown)."""
        if self._store is None or self._board is None:
            return None
        try:
            out = []
            for r in range(self.size):
                key = f"{self._board}/{r}"
                if not self._store.check([key]) or int(self._store.get(key)) < seq:
                    out.append(r)
            return out
        except Exception:
            return None

    # ---- collective steps ------------------------------------------------------------------------
    def _run(self, step: str, fn):
        if self.broken is not None:
            raise TransportError(f"{step} on rank {self.rank}: not started, the group's transport failed in an "
                                 f"earlier step ({self.broken})", step, self.rank, None)
        self._seq += 1
        seq = self._seq
        self._arrive(seq)
        t0 = time.monotonic()
        try:
            return fn()
        except Exception as exc:
            waited = time.monotonic() - t0
            missing = self._missing(seq)
            who = f"rank(s) {missing} had not arrived" if missing else (
                "every rank had arrived" if missing == [] else "which ranks arrived is unknown")
            timed_out = "timed out" in str(exc).lower() or waited >= 0.95 * self.timeout_s
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if timed_out:
                msg = (f"{step} on rank {self.rank}: timed out after {waited:.1f} s (timeout {self.timeout_s:g} s, "
                       f"set with dwdp_comm.init(timeout=...) or {ENV_TIMEOUT}); {who}")
                cls = CollectiveTimeoutError
            else:
                msg = (f"{step} on rank {self.rank}: the transport failed after {waited:.1f} s ({who}; a peer "
                       f"died or closed its connection): {first}")
                cls = TransportError
            self.broken = f"{step}: {cls.__name__}"
            raise cls(msg, step, self.rank, missing) from exc

    def all_gather_object(self, obj: Any, step: str = "object exchange") -> list:
        """Collective: every rank's ``obj`` (picklable), in rank order.

        Raises
        ------
        CollectiveMismatchError
            Ranks are in different steps (every rank that gets here raises it, naming them).
        CollectiveTimeoutError, TransportError
            A rank did not arrive in time, or the transport failed.
        """
        out: list = [None] * self.size
        mine = (self._seq + 1, step, obj)
        self._run(step, lambda: dist.all_gather_object(out, mine, group=self.pg))
        tags = [(o[0], o[1]) for o in out]
        if len(set(tags)) > 1:
            desc = "; ".join(f"rank {r}: step {s!r} (#{n})" for r, (n, s) in enumerate(tags))
            raise CollectiveMismatchError(f"ranks are in different collective steps: {desc}; every rank must make "
                                          f"the same collective calls in the same order", step,
                                          {r: s for r, (_, s) in enumerate(tags)})
        return [o[2] for o in out]

    def barrier(self, step: str = "barrier") -> None:
        """Collective: return once every rank arrived at ``step``."""
        self.all_gather_object(None, step)

    def agree(self, error: str | None, step: str, exc_type: type | None = None, hint: str = "",
              cause: BaseException | None = None) -> None:
        """Collective: raise the same error on every rank if any rank has one; else return.

        Parameters
        ----------
        error : str or None
            This rank's problem, or None.
        step : str
            The operation, for the message.
        exc_type : type, optional
            The error class (default :class:`~dwdp_comm.errors.CollectiveFailedError`).
        hint : str
            A last line of the message saying what to do.
        cause : BaseException, optional
            This rank's own exception, chained as ``__cause__`` where it was raised.
        """
        errors = self.all_gather_object(error, step)
        if isinstance(cause, DwdpError) and all(e == error for e in errors):
            raise cause  # the same library error on every rank (a bad argument, ...): keep its type
        err = gathered_error(errors, step, exc_type, hint)
        if err is not None:
            raise err from cause


def describe(exc: BaseException) -> str:
    """``"TypeName: message"`` (first line), what a rank reports to :meth:`Comm.agree`."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


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

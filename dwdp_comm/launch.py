"""The launcher: run a function on ``world_size`` spawned rank processes, one DWDP group.

:func:`launch` spawns one process per rank (never fork: CUDA and threads do not survive a fork),
sets up torch.distributed over gloo with a file rendezvous (no ports to collide on), creates the
DWDP group and runs ``fn(group, *args)`` on every rank. A child's exception comes back tagged with
its rank; if a rank dies or the timeout passes, the other ranks are killed, so nothing hangs, and
the error says which ranks had finished, which had failed (with their errors) and which were still
running. Ranks die with the launching process, however it dies.

It is library code: ``dwdp-bench`` and the examples launch their ranks with it.
``dwdp_comm.testing.launch`` is the same function (kept for compatibility).
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import tempfile
import time
import traceback
from multiprocessing.connection import wait as _wait_conns
from typing import Any, Callable

from .checks import check_int
from .errors import RankFailedError, bad_arg

__all__ = ["launch", "gpu_count"]

FAILURE_GRACE_S = 2.0  # after a first failure, how long the other ranks may still report theirs


def gpu_count() -> int:
    """CUDA devices visible to torch (0 without CUDA); never initialises CUDA in the parent."""
    try:
        import torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def _die_with_parent(parent_pid: int) -> None:
    """Make this rank die with the launching process, however that one dies (kill -9 included):
    ``PR_SET_PDEATHSIG`` (Linux) kills it at once, and a watchdog thread that sees it reparented
    covers systems without prctl."""
    import ctypes
    import signal
    import threading
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)

    def watch():
        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="dwdp-parent-watchdog", daemon=True).start()


def _child(rank: int, world_size: int, init_file: str, backend: str | None, fn: Callable, args: tuple,
           kwargs: dict, options: dict, timeout: float, conn, parent_pid: int | None = None) -> None:
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    try:
        import torch
        import torch.distributed as dist

        if backend != "sim" and torch.cuda.is_available():
            torch.cuda.set_device(rank % torch.cuda.device_count())
        # Our own store object (public API), so the DWDP group's arrival board can use it too.
        store = dist.FileStore(init_file, world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout))
        try:
            if backend is None:
                result = fn(*args, **kwargs)
            else:
                from .comm import resolve_timeout
                from .group import init
                options = dict(options)
                # Collective steps give up before the whole run does, so that their error (naming
                # the ranks that did not arrive) is what comes back, not a bare launch timeout.
                options.setdefault("timeout", min(resolve_timeout(), max(1.0, 0.75 * timeout)))
                options.setdefault("store", store)
                group = init(backend, **options)
                with group:  # closes it, or aborts it (no collective) when fn raised
                    result = fn(group, *args, **kwargs)
        finally:
            dist.destroy_process_group()
        conn.send(("ok", _picklable(result)))
    except BaseException as exc:  # report everything, SystemExit included
        tb = traceback.format_exc()
        try:
            conn.send(("err", _picklable(exc), tb, time.time()))
        except Exception:
            pass
        raise SystemExit(1)
    finally:
        conn.close()


def _picklable(obj: Any) -> Any:
    try:
        pickle.dumps(obj)
        return obj
    except Exception:
        return repr(obj)


def launch(fn: Callable, world_size: int, *args: Any, backend: str | None = "sim", timeout: float = 120.0,
           options: dict | None = None, **kwargs: Any) -> list:
    """Run ``fn`` on ``world_size`` spawned ranks; return the per-rank results.

    Each rank is a fresh process (the ``spawn`` start method, never ``fork``) that initialises
    torch.distributed over ``gloo`` (a ``torch.distributed.FileStore`` rendezvous) and, unless
    ``backend`` is None, calls :func:`dwdp_comm.init` with that store for its arrival board.
    Blocking: returns when every rank returned, one failed, or ``timeout`` passed; on a failure or
    a timeout the remaining ranks are killed at once. Ranks also die with the caller, however it
    dies (``kill -9`` included: ``PR_SET_PDEATHSIG`` plus a watchdog thread), so none is left
    holding memory or GPUs.

    Parameters
    ----------
    fn : callable
        A module-level (picklable) function. Called as ``fn(group, *args, **kwargs)`` with the
        rank's :class:`~dwdp_comm.group.Group`, or ``fn(*args, **kwargs)`` when ``backend`` is None
        (torch.distributed is then initialised, dwdp_comm is not).
    world_size : int
        Ranks to spawn (>= 1). With GPU backends rank r uses device ``r % device_count``.
    *args, **kwargs
        Passed to ``fn`` (picklable).
    backend : str or None
        Passed to :func:`dwdp_comm.init`.
    timeout : float
        Seconds for the whole run, and the torch.distributed collective timeout. The library's
        collective steps get ``min(DWDP_COMM_TIMEOUT or 300, 0.75 * timeout)`` unless ``options``
        has ``timeout``, so a stuck rank is named by its peers' error before the run times out.
    options : dict, optional
        Options passed to :func:`dwdp_comm.init` (``timeout``, ``store`` and the backend's).

    Returns
    -------
    list
        ``fn``'s return value per rank (its ``repr`` when it cannot be pickled).

    Raises
    ------
    InvalidTypeError
        ``world_size`` is not an int.
    InvalidArgumentError
        ``world_size`` is < 1, or ``timeout`` is not a number > 0.
    RankFailedError
        A rank raised (its exception is the ``__cause__`` and its traceback is in the message), died
        without a word, or the timeout passed. The message and the attributes ``failed`` (rank ->
        error), ``finished`` and ``unfinished`` (ranks) say what every rank had done; the other
        ranks were killed first.
    """
    world_size = check_int("world_size", world_size, low=1)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise bad_arg("timeout", timeout, "a number of seconds > 0")
    ctx = mp.get_context("spawn")
    fd, init_file = tempfile.mkstemp(prefix="dwdp-rdzv-")
    os.close(fd)
    os.unlink(init_file)  # the file store creates it
    procs, conns = [], {}
    try:
        for rank in range(world_size):
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child, name=f"dwdp-rank{rank}",
                            args=(rank, world_size, init_file, backend, fn, args, kwargs, options or {}, timeout,
                                  child, os.getpid()), daemon=True)
            p.start()
            child.close()
            procs.append(p)
            conns[parent] = rank
        return _collect(procs, conns, world_size, timeout)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=10)
        for c in conns:
            c.close()
        if os.path.exists(init_file):
            os.unlink(init_file)


def _collect(procs, conns: dict, world_size: int, timeout: float) -> list:
    results: list = [None] * world_size
    pending = dict(conns)
    finished: list[int] = []
    failures: dict[int, tuple] = {}  # rank -> ("died", exitcode) or ("raised", exc, traceback, time)
    deadline = time.monotonic() + timeout
    while pending and not failures:
        left = deadline - time.monotonic()
        if left <= 0:
            unfinished = sorted(pending.values())
            msg = f"timeout after {timeout:.0f} s: rank(s) {unfinished} had not finished"
            msg += f", rank(s) {sorted(finished)} had finished" if finished else ", no rank had finished"
            raise RankFailedError(msg + "; all ranks were killed", unfinished=unfinished, finished=sorted(finished))
        _poll(procs, pending, results, finished, failures, min(left, 1.0))
    if failures:
        # A dead rank makes its peers fail too (closed connections): wait a moment so the root
        # cause, not a consequence, is reported, and the later failures are listed with it.
        grace = time.monotonic() + FAILURE_GRACE_S
        while pending and time.monotonic() < grace:
            _poll(procs, pending, results, finished, failures, 0.2)
        _raise_failure(failures, sorted(finished), sorted(pending.values()))
    return results


def _poll(procs, pending: dict, results: list, finished: list, failures: dict, wait_s: float) -> None:
    for conn in _wait_conns(list(pending), timeout=wait_s):
        rank = pending.pop(conn)
        try:
            msg = conn.recv()
        except EOFError:
            procs[rank].join(5)
            failures[rank] = ("died", procs[rank].exitcode)
            continue
        if msg[0] == "ok":
            results[rank] = msg[1]
            finished.append(rank)
        else:
            failures[rank] = ("raised", msg[1], msg[2], msg[3])
    # A process can die (segfault, kill) without its pipe reporting EOF yet: check exit codes too.
    for conn, rank in list(pending.items()):
        code = procs[rank].exitcode
        if code not in (None, 0) and not conn.poll():
            pending.pop(conn)
            failures[rank] = ("died", code)


def _summary(failure: tuple) -> str:
    """One line for a failed rank: ``died with exit code N`` or ``TypeName: first line``."""
    if failure[0] == "died":
        return f"died with exit code {failure[1]} without reporting"
    exc = failure[1]
    kind = type(exc).__name__ if isinstance(exc, BaseException) else "error"
    text = str(exc).strip()
    return f"{kind}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _raise_failure(failures: dict, finished: list[int], unfinished: list[int]) -> None:
    died = sorted(r for r, f in failures.items() if f[0] == "died")
    # The root cause: a rank that died silently, else the rank that raised first.
    rank = died[0] if died else min(failures, key=lambda r: failures[r][3])
    others = sorted(r for r in failures if r != rank)
    failed = {r: _summary(f) for r, f in sorted(failures.items())}
    context = ""
    if others:
        context += f"\nrank(s) {others} failed after it:\n" + "\n".join(f"  rank {r}: {failed[r]}" for r in others)
    if unfinished:
        context += f"\nrank(s) {unfinished} had not finished (killed)"
    if finished:
        context += f"\nrank(s) {finished} had finished"
    info = dict(rank=rank, failed=failed, finished=finished, unfinished=unfinished)
    f = failures[rank]
    if f[0] == "died":
        raise RankFailedError(f"rank {rank} died with exit code {f[1]} without reporting; all ranks were killed"
                              + context, **info)
    exc, tb = f[1], f[2]
    kind = type(exc).__name__ if isinstance(exc, BaseException) else "an error"
    err = RankFailedError(f"rank {rank} raised {kind}: {exc}{context}\n--- traceback of rank {rank} ---\n{tb}",
                          remote_traceback=tb, **info)
    if isinstance(exc, BaseException):
        raise err from exc
    raise err

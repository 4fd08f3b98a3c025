"""Multi-process helpers for tests and examples.

:func:`launch` spawns one process per rank (never fork: CUDA and threads do not survive a fork),
sets up torch.distributed over gloo with a file rendezvous (no ports to collide on), creates the
DWDP group and runs ``fn(group, *args)`` on every rank. A child's exception comes back tagged with
its rank; if a rank dies or the timeout passes, the other ranks are killed, so nothing hangs.
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

from .errors import RankFailedError, bad_arg

__all__ = ["launch", "gpu_count"]


def gpu_count() -> int:
    """CUDA devices visible to torch (0 without CUDA); never initialises CUDA in the parent."""
    try:
        import torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def _child(rank: int, world_size: int, init_file: str, backend: str | None, fn: Callable, args: tuple,
           kwargs: dict, options: dict, timeout: float, conn) -> None:
    try:
        import torch
        import torch.distributed as dist

        if backend not in (None, "sim") and torch.cuda.is_available():
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout))
        try:
            if backend is None:
                result = fn(*args, **kwargs)
            else:
                from .group import init
                group = init(backend, **options)
                try:
                    result = fn(group, *args, **kwargs)
                finally:
                    if not group.closed:
                        group.close()
        finally:
            dist.destroy_process_group()
        conn.send(("ok", _picklable(result)))
    except BaseException as exc:  # report everything, SystemExit included
        tb = traceback.format_exc()
        try:
            conn.send(("err", _picklable(exc), tb))
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

    Parameters
    ----------
    fn : callable
        A module-level (picklable) function. Called as ``fn(group, *args, **kwargs)`` with the
        rank's :class:`~dwdp_comm.group.Group`, or ``fn(*args, **kwargs)`` when ``backend`` is None
        (torch.distributed is then initialised, dwdp_comm is not).
    world_size : int
        Ranks to spawn (>= 1). With GPU backends rank r uses device ``r % device_count``.
    backend : str or None
        Passed to :func:`dwdp_comm.init`.
    timeout : float
        Seconds for the whole run, and the torch.distributed collective timeout.
    options : dict, optional
        Backend options passed to :func:`dwdp_comm.init`.

    Returns
    -------
    list
        ``fn``'s return value per rank (its ``repr`` when it cannot be pickled).

    Raises
    ------
    RankFailedError
        A rank raised (its exception is the ``__cause__`` and its traceback is in the message), died
        without a word, or the timeout passed. The other ranks are killed first.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise bad_arg("world_size", world_size, "an int >= 1")
    if not timeout > 0:
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
                                  child), daemon=True)
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
    deadline = time.monotonic() + timeout
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RankFailedError(f"timeout after {timeout:.0f} s: rank(s) {sorted(pending.values())} did not finish; "
                                  "all ranks were killed")
        for conn in _wait_conns(list(pending), timeout=min(left, 1.0)):
            rank = pending.pop(conn)
            try:
                msg = conn.recv()
            except EOFError:
                procs[rank].join(5)
                raise RankFailedError(f"rank {rank} died without reporting (exit code {procs[rank].exitcode}); "
                                      "all ranks were killed", rank=rank) from None
            if msg[0] == "ok":
                results[rank] = msg[1]
            else:
                exc, tb = msg[1], msg[2]
                err = RankFailedError(f"rank {rank} raised {type(exc).__name__ if isinstance(exc, BaseException) else 'an error'}: "
                                      f"{exc}\n--- traceback of rank {rank} ---\n{tb}", rank=rank, remote_traceback=tb)
                if isinstance(exc, BaseException):
                    raise err from exc
                raise err
        # A process can die (segfault, kill) without closing its pipe cleanly: check exit codes too.
        for conn, rank in list(pending.items()):
            p = procs[rank]
            if p.exitcode is not None and p.exitcode != 0 and not conn.poll():
                raise RankFailedError(f"rank {rank} died with exit code {p.exitcode}; all ranks were killed", rank=rank)
    return results

"""Object exchange between the ranks of a group: :class:`Comm`, the one transport of every
collective step of the library (backends, stores, prefetchers, benchmarks).

Every step has a name, a timeout and a sequence number, so that a failure is reported the same way
everywhere:

* a rank that fails locally inside a step: :meth:`Comm.agree` makes every rank raise the same
  :class:`~dwdp_comm.errors.CollectiveFailedError` naming it (one builder,
  :func:`~dwdp_comm.errors.gathered_error`, for every "all ranks raise the same error" path);
* ranks in different steps (one closing while the others commit): every rank raises
  :class:`~dwdp_comm.errors.CollectiveMismatchError` naming each rank's step;
* a rank that does not arrive within the timeout, or dies: the others raise
  :class:`~dwdp_comm.errors.CollectiveTimeoutError` / :class:`~dwdp_comm.errors.TransportError`
  naming the step and the ranks that had not arrived (an arrival board in the rendezvous store).

It sits below the backends (they receive a ``Comm``; none imports :mod:`dwdp_comm.group`) and needs
only ``torch.distributed``. :func:`describe` is what a rank reports to :meth:`Comm.agree`.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import time
from typing import Any

import torch.distributed as dist

from .errors import (CollectiveMismatchError, CollectiveTimeoutError, DwdpError, TransportError, bad_arg,
                     gathered_error)

__all__ = ["Comm", "describe", "resolve_timeout", "board_store", "ENV_TIMEOUT", "DEFAULT_TIMEOUT_S"]

log = logging.getLogger("dwdp_comm")
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

    def agreed_error(self, error: str | None, step: str) -> str | None:
        """Collective: the one error every rank reports for ``step``, returned instead of raised.

        For steps whose failure is a result, not an exception (a benchmark row that reports a copy
        engine some rank could not create). Every rank returns the same value: None when no rank
        has an error; the message itself when every failing rank reports the same; else
        ``"rank r: message; ..."`` over the failing ranks.

        Raises
        ------
        CollectiveMismatchError, CollectiveTimeoutError, TransportError
            As :meth:`all_gather_object`.
        """
        bad = [(r, e) for r, e in enumerate(self.all_gather_object(error, step)) if e]
        if not bad:
            return None
        if len({e for _, e in bad}) == 1:
            return bad[0][1]
        return "; ".join(f"rank {r}: {e}" for r, e in bad)


def describe(exc: BaseException) -> str:
    """``"TypeName: message"`` (first line), what a rank reports to :meth:`Comm.agree`."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")

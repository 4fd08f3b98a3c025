"""Exceptions raised by dwdp_comm.

Every error derives from :class:`DwdpError`. Errors caused by a bad argument also derive from
``ValueError`` (or ``TypeError`` for a wrong type) so that generic handlers keep working. Messages
name the argument, what was given and what was expected; :func:`bad_arg` builds them in one place.
"""

from __future__ import annotations

__all__ = [
    "DwdpError",
    "InvalidArgumentError",
    "InvalidTypeError",
    "ClosedError",
    "CollectiveError",
    "CollectiveMismatchError",
    "CollectiveFailedError",
    "CollectiveTimeoutError",
    "TransportError",
    "BackendUnavailableError",
    "SlotStillHeldError",
    "GraphCaptureError",
    "PeerAccessError",
    "RankFailedError",
    "MissingDependencyError",
    "bad_arg",
    "bad_type",
    "gathered_error",
]


class DwdpError(Exception):
    """Base class of every error raised by dwdp_comm."""


class InvalidArgumentError(DwdpError, ValueError):
    """An argument has a valid type but a value that is not accepted."""


class InvalidTypeError(DwdpError, TypeError):
    """An argument has the wrong type."""


class ClosedError(DwdpError, RuntimeError):
    """An object was used after ``close()`` (a second ``close()`` does nothing: every ``close`` of
    the library is idempotent)."""


class CollectiveError(DwdpError, RuntimeError):
    """A collective step of the group did not complete on every rank.

    Attributes
    ----------
    step : str
        The collective step (``"WeightStore.commit: copying shards into the heap"``, ...).
    ranks : dict[int, str]
        The ranks at fault and what each reported (empty when unknown).
    """

    def __init__(self, message: str, step: str = "", ranks: dict | None = None):
        super().__init__(message)
        self.step = step
        self.ranks = dict(ranks or {})


class CollectiveMismatchError(CollectiveError):
    """Ranks disagreed in a collective call (different registrations, arguments, ...).

    Raised on every rank with the same message, so that no rank is left waiting.
    """


class CollectiveFailedError(CollectiveError):
    """A collective step failed locally on some rank(s); every rank raises it, with the same message
    naming those ranks and their errors (the failing rank chains its own exception as ``__cause__``)."""


class TransportError(CollectiveError):
    """The object-exchange transport (gloo) failed inside a collective step: a peer died or closed
    its connection. Names this rank, the step and the ranks that had not arrived at it.

    Attributes
    ----------
    rank : int
        The rank that raised it.
    missing : list of int or None
        Ranks that had not arrived at the step (None when it could not be told).
    """

    def __init__(self, message: str, step: str = "", rank: int = -1, missing: list | None = None):
        super().__init__(message, step, {r: "did not arrive" for r in (missing or ())})
        self.rank, self.missing = rank, missing


class CollectiveTimeoutError(TransportError, TimeoutError):
    """Some ranks did not arrive at a collective step within the group's timeout
    (``dwdp_comm.init(timeout=...)`` or ``DWDP_COMM_TIMEOUT``); ``missing`` names them."""


class BackendUnavailableError(DwdpError, RuntimeError):
    """A heap backend cannot be used here (missing package, no GPU, no peer access)."""


class PeerAccessError(BackendUnavailableError):
    """Two GPUs of the group cannot map each other's memory."""


class SlotStillHeldError(DwdpError, RuntimeError):
    """Waiting on a prefetch that cannot start because its slot's previous handle is unreleased."""


class GraphCaptureError(DwdpError, RuntimeError):
    """A call that a CUDA graph capture cannot contain (or that mixes work from inside and outside a
    capture): the message names the call and what to do instead."""


class MissingDependencyError(DwdpError, ImportError):
    """An optional package (CuPy, cuda-python, nvshmem4py, Numba) is not installed or failed to import."""


class RankFailedError(DwdpError, RuntimeError):
    """A rank launched by :func:`dwdp_comm.launch.launch` raised, died or timed out.

    Attributes
    ----------
    rank : int or None
        The rank that failed first (None for a timeout of the whole run).
    remote_traceback : str
        The child's formatted traceback, when it raised.
    failed : dict[int, str]
        Every rank that failed, with one line saying how (``"ValueError: ..."``, ``"died with exit
        code 3 ..."``).
    finished : list of int
        Ranks that had returned normally.
    unfinished : list of int
        Ranks still running when the launch gave up (then killed).
    """

    def __init__(self, message: str, rank: int | None = None, remote_traceback: str = "",
                 failed: dict | None = None, finished: list | None = None, unfinished: list | None = None):
        super().__init__(message)
        self.rank = rank
        self.remote_traceback = remote_traceback
        self.failed = dict(failed or {})
        self.finished = list(finished or [])
        self.unfinished = list(unfinished or [])


def bad_arg(name: str, got: object, expected: str, hint: str = "") -> InvalidArgumentError:
    """Build the standard invalid-argument error: ``name: got <got>, expected <expected>``."""
    msg = f"{name}: got {got!r}, expected {expected}"
    if hint:
        msg += f" ({hint})"
    return InvalidArgumentError(msg)


def bad_type(name: str, got: object, expected: str) -> InvalidTypeError:
    """Build the standard wrong-type error, naming the argument and the type given."""
    return InvalidTypeError(f"{name}: got an object of type {type(got).__name__}, expected {expected}")


def gathered_error(errors, step: str, exc_type: type = None, hint: str = "") -> "CollectiveError | None":
    """The one error every rank raises after a collective check, or None when no rank reported one.

    Parameters
    ----------
    errors : sequence of (str or None)
        Every rank's problem, in rank order (the result of one all-gather, so every rank builds the
        same message).
    step : str
        The collective step, for the message.
    exc_type : type, optional
        The class to raise (default :class:`CollectiveFailedError`); a class that is not a
        :class:`CollectiveError` is built from the message alone.
    hint : str
        A last line saying what to do.
    """
    bad = {r: e for r, e in enumerate(errors) if e}
    if not bad:
        return None
    exc_type = exc_type or CollectiveFailedError
    lines = "\n".join(f"  rank {r}: {e}" for r, e in bad.items())
    msg = f"{step} failed on {len(bad)} of {len(errors)} ranks (rank(s) {sorted(bad)}):\n{lines}"
    if hint:
        msg += f"\n{hint}"
    if issubclass(exc_type, CollectiveError) and not issubclass(exc_type, TransportError):
        return exc_type(msg, step, bad)
    return exc_type(msg)

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
    "CollectiveMismatchError",
    "BackendUnavailableError",
    "SlotStillHeldError",
    "PeerAccessError",
    "RankFailedError",
    "MissingDependencyError",
    "bad_arg",
]


class DwdpError(Exception):
    """Base class of every error raised by dwdp_comm."""


class InvalidArgumentError(DwdpError, ValueError):
    """An argument has a valid type but a value that is not accepted."""


class InvalidTypeError(DwdpError, TypeError):
    """An argument has the wrong type."""


class ClosedError(DwdpError, RuntimeError):
    """An object was used after ``close()``, or closed twice."""


class CollectiveMismatchError(DwdpError, RuntimeError):
    """Ranks disagreed in a collective call (different registrations, arguments, ...).

    Raised on every rank with the same message, so that no rank is left waiting.
    """


class BackendUnavailableError(DwdpError, RuntimeError):
    """A heap backend cannot be used here (missing package, no GPU, no peer access)."""


class PeerAccessError(BackendUnavailableError):
    """Two GPUs of the group cannot map each other's memory."""


class SlotStillHeldError(DwdpError, RuntimeError):
    """Waiting on a prefetch that cannot start because its slot's previous handle is unreleased."""


class MissingDependencyError(DwdpError, ImportError):
    """An optional package (CuPy, cuda-python, nvshmem4py, Numba) is not installed or failed to import."""


class RankFailedError(DwdpError, RuntimeError):
    """A rank launched by :func:`dwdp_comm.testing.launch` raised, died or timed out.

    Attributes
    ----------
    rank : int or None
        The rank that failed first (None for a timeout of the whole group).
    remote_traceback : str
        The child's formatted traceback, when it raised.
    """

    def __init__(self, message: str, rank: int | None = None, remote_traceback: str = ""):
        super().__init__(message)
        self.rank = rank
        self.remote_traceback = remote_traceback


def bad_arg(name: str, got: object, expected: str, hint: str = "") -> InvalidArgumentError:
    """Build the standard invalid-argument error: ``name: got <got>, expected <expected>``."""
    msg = f"{name}: got {got!r}, expected {expected}"
    if hint:
        msg += f" ({hint})"
    return InvalidArgumentError(msg)


def bad_type(name: str, got: object, expected: str) -> InvalidTypeError:
    """Build the standard wrong-type error, naming the argument and the type given."""
    return InvalidTypeError(f"{name}: got an object of type {type(got).__name__}, expected {expected}")

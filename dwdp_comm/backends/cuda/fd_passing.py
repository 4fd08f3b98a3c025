"""Passing file descriptors between processes of one host (``pidfd_getfd``)."""

from __future__ import annotations

import ctypes
import os

__all__ = ["pidfd_getfd"]


# ---- fd passing -----------------------------------------------------------------------------------
_SYS_PIDFD_OPEN = 434  # same number on x86_64 and aarch64 (the unified syscall table)
_SYS_PIDFD_GETFD = 438
_libc = None


def pidfd_getfd(pid: int, fd: int) -> int:
    """Duplicate file descriptor ``fd`` of process ``pid`` into this process (Linux >= 5.6).

    Needs ptrace permission over ``pid`` (PTRACE_MODE_ATTACH_REALCREDS): same user and
    ``/proc/sys/kernel/yama/ptrace_scope`` 0, or CAP_SYS_PTRACE (root). Raises ``OSError`` naming
    the errno otherwise.
    """
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    if hasattr(os, "pidfd_open"):
        pidfd = os.pidfd_open(pid)
    else:
        pidfd = _libc.syscall(ctypes.c_long(_SYS_PIDFD_OPEN), ctypes.c_long(pid), ctypes.c_long(0))
        if pidfd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"pidfd_open({pid}): {os.strerror(e)}")
    try:
        got = _libc.syscall(ctypes.c_long(_SYS_PIDFD_GETFD), ctypes.c_long(pidfd), ctypes.c_long(fd), ctypes.c_long(0))
        if got < 0:
            e = ctypes.get_errno()
            hint = ""
            if e in (1, 13):  # EPERM, EACCES
                hint = (" (pidfd_getfd needs ptrace permission over the peer: run the ranks as root or with "
                        "CAP_SYS_PTRACE, or set /proc/sys/kernel/yama/ptrace_scope to 0)")
            raise OSError(e, f"pidfd_getfd(pid {pid}, fd {fd}): {os.strerror(e)}{hint}")
        return int(got)
    finally:
        os.close(pidfd)

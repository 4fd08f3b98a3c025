"""Helpers for tests and debugging.

:func:`launch` and :func:`gpu_count` live in :mod:`dwdp_comm.launch` (library code: the CLI uses
them); they are re-exported here for compatibility.
"""

from __future__ import annotations

from .launch import gpu_count, launch

__all__ = ["launch", "gpu_count"]

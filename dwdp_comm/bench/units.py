"""Byte sizes as the ``dwdp-bench`` flags take and print them (binary units: K = 1024).

The one home of size parsing and size text for :mod:`dwdp_comm.bench` (the CLI, ``advise``, the
report); it imports nothing from the package, so any module may use it.
"""

from __future__ import annotations

import re

from ..errors import bad_arg

__all__ = ["parse_size", "format_size", "chunk_text"]

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str, what: str = "size") -> int:
    """``"8M"`` -> 8388608 (K, M, G, T are powers of 1024; an optional ``iB``/``B`` suffix).

    Parameters
    ----------
    text : str or int
        The size as typed.
    what : str
        The argument's name, for the error.

    Raises
    ------
    InvalidArgumentError
        ``text`` is not an integer with an optional unit.
    """
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*", str(text).upper())
    if not m:
        raise bad_arg(what, text, "an integer with an optional K, M, G or T suffix, e.g. 8M")
    return int(m.group(1)) * _UNITS[m.group(2)]


def format_size(n: int) -> str:
    """``8388608`` -> ``"8M"`` (binary units, as the flags take them; exact multiples only)."""
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def chunk_text(c: int) -> str:
    """A copy chunk in words: ``0`` -> ``"whole-copy"``, ``8 << 20`` -> ``"8 MiB"``, else bytes."""
    return "whole-copy" if c == 0 else f"{c >> 20} MiB" if c % (1 << 20) == 0 else f"{c} B"

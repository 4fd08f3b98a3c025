"""The integer-argument check and the round-up every layer shares (one rule, one message).

:func:`check_int` is what every ``layer``, ``rank``, ``depth``, ``chunk_nbytes``... argument goes
through: an integer that is not a ``bool`` (Python ints, NumPy integers, 0-d integer tensors:
anything with ``__index__``) and, optionally, inside bounds. :func:`align_up` rounds a byte count
up to an alignment (heap regions, slots, VMM and NVSHMEM allocations).
"""

from __future__ import annotations

import operator

from .errors import bad_arg, bad_type

__all__ = ["check_int", "align_up"]


def check_int(name: str, value: object, *, low: int | None = None, high: int | None = None,
              expected: str = "") -> int:
    """``value`` as a Python int, or raise naming ``name``.

    Parameters
    ----------
    name : str
        The argument, for the message (``"layer"``, ``"world_size"``, ...).
    value : object
        What was given. ``bool`` is refused (``True`` is an ``int`` to Python, never a count here).
    low, high : int, optional
        Inclusive bounds.
    expected : str
        What the message says was expected when ``value`` is out of bounds (default: the bounds,
        ``"an int >= 1"``, ``"an int in [0, 4)"``).

    Returns
    -------
    int

    Raises
    ------
    InvalidTypeError
        ``value`` is not an integer (a float, a str, a bool, ...).
    InvalidArgumentError
        ``value`` is outside ``[low, high]``.
    """
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise bad_type(name, value, "an int")
    try:
        v = operator.index(value)
    except TypeError:  # a tensor with several elements, or of a float dtype
        raise bad_type(name, value, "an int") from None
    if (low is not None and v < low) or (high is not None and v > high):
        raise bad_arg(name, value, expected or _bounds(low, high))
    return v


def _bounds(low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        return f"an int in [{low}, {high + 1})"
    return f"an int >= {low}" if low is not None else f"an int <= {high}"


def align_up(nbytes: int, alignment: int) -> int:
    """``nbytes`` rounded up to a multiple of ``alignment`` (> 0); ``align_up(0, a) == 0``."""
    return -(-nbytes // alignment) * alignment

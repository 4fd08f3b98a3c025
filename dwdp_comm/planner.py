"""Copy planner: turns "this rank needs these byte ranges from these peers" into an ordered plan.

Pure Python + NumPy, no GPU. A plan is a list of copies ``(slot, src_rank, src_offset, dst_offset,
nbytes)`` in issue order. Offsets are relative: ``src_offset`` to the layer's region in the source
rank's symmetric heap, ``dst_offset`` to the prefetch slot, so one plan serves every layer of the
same shape.

Each source's ranges are read as one byte stream cut into chunks of ``chunk_nbytes``; a chunk that
straddles two ranges becomes two copies with the same ``slot``. The ``slot`` is a time-division
step: copies with equal ``slot`` are meant to run at the same time, and a policy decides which source
each rank reads in each slot.

Policies (``rank`` = d, group size = G, chunks of source s numbered k = 0, 1, ...)::

    naive        slots:  s=0: k0 k1 k2 | s=1: k0 k1 k2 | s=2: ...        (all ranks read 0, then 1, ...)
    rotated      slots:  s=d+1: k0 k1 | s=d+2: k0 k1 | ...                (ranks start at different peers)
    round_robin  slot t reads chunk t // (G-1) of source (d + 1 + t % (G-1)) % G
                 d=0:  1 2 3 1 2 3 ...     d=1:  2 3 0 2 3 0 ...
                 d=2:  3 0 1 3 0 1 ...     d=3:  0 1 2 0 1 2 ...
                 In every slot the map d -> source is a permutation, so ranks in lockstep never read
                 the same source at the same time. A source with fewer chunks leaves its slots empty
                 instead of shifting the others, which keeps that property with uneven shards.

Copies from the rank itself (``src_rank == rank``, used when local experts must be copied into a
slot) never cross the fabric; every policy places them after all remote copies.

Add a policy with :func:`register_policy`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, Mapping, Sequence

import numpy as np

from .checks import check_int
from .errors import bad_arg, bad_type

__all__ = ["CopyRange", "CopyPlan", "make_plan", "register_policy", "policies", "PlanCache"]


@dataclass(frozen=True)
class CopyRange:
    """One contiguous run of bytes this rank needs: ``nbytes`` at ``src_offset`` of ``src_rank``'s
    heap region go to ``dst_offset`` of the slot."""

    src_rank: int
    src_offset: int
    dst_offset: int
    nbytes: int


class CopyPlan:
    """An ordered list of chunk copies (immutable; arrays are read-only NumPy ``int64``).

    Attributes
    ----------
    slot, src_rank, src_offset, dst_offset, nbytes : numpy.ndarray
        One entry per copy, shape ``[num_copies]``, in issue order (``slot`` non-decreasing).
    policy : str
    chunk_nbytes : int
    rank, group_size : int
    """

    __slots__ = ("slot", "src_rank", "src_offset", "dst_offset", "nbytes", "policy", "chunk_nbytes",
                 "rank", "group_size")

    def __init__(self, slot, src_rank, src_offset, dst_offset, nbytes, *, policy, chunk_nbytes, rank,
                 group_size):
        arrays = [np.ascontiguousarray(a, dtype=np.int64) for a in
                  (slot, src_rank, src_offset, dst_offset, nbytes)]
        for a in arrays:
            a.setflags(write=False)
        self.slot, self.src_rank, self.src_offset, self.dst_offset, self.nbytes = arrays
        self.policy, self.chunk_nbytes, self.rank, self.group_size = policy, chunk_nbytes, rank, group_size

    def __len__(self) -> int:
        return int(self.nbytes.shape[0])

    @property
    def total_nbytes(self) -> int:
        """Bytes copied by the whole plan."""
        return int(self.nbytes.sum())

    @property
    def num_slots(self) -> int:
        """Number of time-division steps (``max(slot) + 1``; 0 for an empty plan)."""
        return int(self.slot[-1]) + 1 if len(self) else 0

    def nbytes_by_source(self) -> dict[int, int]:
        """Bytes read from each source rank."""
        out: dict[int, int] = {}
        for s, n in zip(self.src_rank.tolist(), self.nbytes.tolist()):
            out[s] = out.get(s, 0) + n
        return out

    def copies(self) -> Iterable[tuple[int, int, int, int, int]]:
        """Iterate ``(slot, src_rank, src_offset, dst_offset, nbytes)`` in issue order."""
        return zip(self.slot.tolist(), self.src_rank.tolist(), self.src_offset.tolist(),
                   self.dst_offset.tolist(), self.nbytes.tolist())

    def __repr__(self) -> str:
        return (f"CopyPlan(policy={self.policy!r}, rank={self.rank}, group_size={self.group_size}, "
                f"copies={len(self)}, slots={self.num_slots}, nbytes={self.total_nbytes})")


# A policy maps (chunk counts per source, rank, group size) to the slot of every chunk:
#   policy(num_chunks: dict[src, int], rank, group_size) -> dict[src, np.ndarray[int64] of slots]
# Chunks of one source must get increasing slots (a source's stream is read in order).
PolicyFn = Callable[[Mapping[int, int], int, int], Mapping[int, np.ndarray]]
_POLICIES: dict[str, PolicyFn] = {}


def register_policy(name: str, *, replace: bool = False) -> Callable[[PolicyFn], PolicyFn]:
    """Decorator that makes a policy function selectable as ``policy=name`` (and as a
    :class:`~dwdp_comm.Prefetcher` ``schedule``).

    Parameters
    ----------
    name : str
        The policy's name (non-empty).
    replace : bool
        Allow replacing a policy already registered under ``name`` (default: an error).

    Returns
    -------
    callable
        The decorator; it returns the function unchanged.

    Notes
    -----
    A policy is ``fn(num_chunks, rank, group_size) -> {src_rank: slots}``: ``num_chunks`` maps
    each remote source rank to its number of chunks; the result gives every chunk of each source
    its time-division slot, an ``int64`` array of shape ``[num_chunks[src]]``, strictly
    increasing (a source's byte stream is read in order). :func:`make_plan` checks both.
    Registration is per process: spawned ranks must register the policy too (e.g. at import of
    the module that defines it).

    Examples
    --------
    >>> @register_policy("reverse")
    ... def reverse(num_chunks, rank, group_size):
    ...     out, t = {}, 0
    ...     for s in sorted(num_chunks, reverse=True):
    ...         out[s] = np.arange(t, t + num_chunks[s]); t += num_chunks[s]
    ...     return out
    """
    if not isinstance(name, str) or not name:
        raise bad_arg("name", name, "a non-empty str")
    if name in _POLICIES and not replace:
        raise bad_arg("name", name, f"a name not yet registered (registered: {policies()})",
                      "pass replace=True to replace it")

    def deco(fn: PolicyFn) -> PolicyFn:
        if not callable(fn):
            raise bad_type("fn", fn, "a callable fn(num_chunks, rank, group_size) -> {src: slots}")
        _POLICIES[name] = fn
        return fn
    return deco


def policies() -> list[str]:
    """Names of the registered policies, sorted."""
    return sorted(_POLICIES)


def _sequential(order: Sequence[int], num_chunks: Mapping[int, int]) -> dict[int, np.ndarray]:
    out, t = {}, 0
    for s in order:
        n = num_chunks.get(s, 0)
        out[s] = np.arange(t, t + n, dtype=np.int64)
        t += n
    return out


@register_policy("naive")
def _naive(num_chunks, rank, group_size):
    return _sequential(sorted(num_chunks), num_chunks)


@register_policy("rotated")
def _rotated(num_chunks, rank, group_size):
    order = [(rank + 1 + j) % group_size for j in range(group_size)]
    return _sequential([s for s in order if s in num_chunks], num_chunks)


@register_policy("round_robin")
def _round_robin(num_chunks, rank, group_size):
    lanes = max(group_size - 1, 1)
    out = {}
    for s, n in num_chunks.items():
        lane = (s - rank - 1) % group_size  # 0 .. G-2 for peers
        out[s] = np.arange(n, dtype=np.int64) * lanes + lane
    return out


def _chunk_stream(ranges: list[CopyRange], chunk_nbytes: int):
    """Cut one source's ranges (a byte stream, in the given order) into chunk pieces.

    Returns arrays (chunk_index, src_offset, dst_offset, nbytes), one entry per piece.
    """
    if len(ranges) == 1:  # the common case, without the general path's per-call overhead
        r = ranges[0]
        cuts = np.arange(0, r.nbytes, chunk_nbytes, dtype=np.int64)
        nb = np.minimum(chunk_nbytes, r.nbytes - cuts)
        return cuts // chunk_nbytes, r.src_offset + cuts, r.dst_offset + cuts, nb
    n = np.fromiter((r.nbytes for r in ranges), dtype=np.int64, count=len(ranges))
    src = np.fromiter((r.src_offset for r in ranges), dtype=np.int64, count=len(ranges))
    dst = np.fromiter((r.dst_offset for r in ranges), dtype=np.int64, count=len(ranges))
    start = np.concatenate(([0], np.cumsum(n)[:-1]))
    total = int(n.sum())
    cuts = np.union1d(start, np.arange(0, total, chunk_nbytes, dtype=np.int64))
    ends = np.append(cuts[1:], total)
    which = np.searchsorted(start, cuts, side="right") - 1
    delta = cuts - start[which]
    return cuts // chunk_nbytes, src[which] + delta, dst[which] + delta, ends - cuts


def _coalesce(ranges: list[CopyRange]) -> list[CopyRange]:
    """Merge ranges that continue each other in both source and destination."""
    out: list[CopyRange] = []
    for r in ranges:
        if r.nbytes == 0:
            continue
        if out:
            p = out[-1]
            if (p.src_rank == r.src_rank and p.src_offset + p.nbytes == r.src_offset
                    and p.dst_offset + p.nbytes == r.dst_offset):
                out[-1] = CopyRange(p.src_rank, p.src_offset, p.dst_offset, p.nbytes + r.nbytes)
                continue
        out.append(r)
    return out


def make_plan(ranges: Iterable[CopyRange], *, rank: int, group_size: int, policy: str = "round_robin",
              chunk_nbytes: int = 8 << 20) -> CopyPlan:
    """Build the copy plan for one prefetch.

    Parameters
    ----------
    ranges : iterable of CopyRange
        What this rank needs. Ranges of one source are read in the order given (after merging
        ranges that continue each other). Destinations must not overlap (checked).
    rank, group_size : int
        This rank and the group size; every ``src_rank`` must be in ``[0, group_size)``.
    policy : str
        One of :func:`policies`.
    chunk_nbytes : int
        Chunk size (> 0). Each source's stream is cut at multiples of it.

    Returns
    -------
    CopyPlan
        Copies in issue order; every needed byte is copied exactly once, chunks of one source in
        stream order, this rank's own ranges (``src_rank == rank``) after every remote copy.

    Raises
    ------
    InvalidArgumentError
        Unknown ``policy``, ``chunk_nbytes <= 0``, a ``src_rank`` outside the group, negative
        offsets or sizes, overlapping destinations, or a policy that returned invalid slots.
    InvalidTypeError
        ``chunk_nbytes`` is not an int.

    Notes
    -----
    Pure host computation (NumPy); :class:`PlanCache` keeps plans so that a layer shape and
    expert set is planned once.
    """
    if policy not in _POLICIES:
        raise bad_arg("policy", policy, f"one of {policies()}")
    chunk_nbytes = check_int("chunk_nbytes", chunk_nbytes, low=1, expected="an int > 0")
    ranges = list(ranges)
    for r in ranges:
        if not 0 <= r.src_rank < group_size:
            raise bad_arg("ranges.src_rank", r.src_rank, f"an int in [0, {group_size})")
        if r.nbytes < 0 or r.src_offset < 0 or r.dst_offset < 0:
            raise bad_arg("ranges", r, "non-negative offsets and sizes")
    _check_no_overlap(ranges)

    by_src: dict[int, list[CopyRange]] = {}
    for r in _coalesce(ranges):
        by_src.setdefault(r.src_rank, []).append(r)
    pieces = {s: _chunk_stream(rs, int(chunk_nbytes)) for s, rs in by_src.items()}
    remote_chunks = {s: int(p[0][-1]) + 1 for s, p in pieces.items() if s != rank}
    slots = dict(_POLICIES[policy](remote_chunks, rank, group_size)) if remote_chunks else {}
    if rank in pieces:  # local copies go last, in order
        t0 = max((int(v[-1]) + 1 for v in slots.values() if len(v)), default=0)
        slots[rank] = t0 + np.arange(int(pieces[rank][0][-1]) + 1, dtype=np.int64)

    cols: list[list[np.ndarray]] = [[], [], [], [], []]
    for s, (chunk, src, dst, nb) in pieces.items():
        if s not in slots:
            raise bad_arg("policy", policy, f"a policy that gives slots to every source (source {s} has none)")
        chunk_slots = np.asarray(slots[s], dtype=np.int64)
        if chunk_slots.shape != (int(chunk[-1]) + 1,) or np.any(np.diff(chunk_slots) <= 0) \
                or np.any(chunk_slots < 0):
            raise bad_arg("policy", policy, f"a policy that gives the {int(chunk[-1]) + 1} chunk(s) of source {s} "
                          f"strictly increasing slots >= 0, not {chunk_slots.tolist()[:8]}")
        for col, a in zip(cols, (chunk_slots[chunk], np.full_like(src, s), src, dst, nb)):
            col.append(a)
    if not cols[0]:
        empty = np.zeros(0, dtype=np.int64)
        return CopyPlan(empty, empty, empty, empty, empty, policy=policy, chunk_nbytes=int(chunk_nbytes),
                        rank=rank, group_size=group_size)
    slot, src_rank, src_off, dst_off, nb = (np.concatenate(c) for c in cols)
    order = np.argsort(slot, kind="stable")  # by slot; within a slot, stream order
    return CopyPlan(slot[order], src_rank[order], src_off[order], dst_off[order], nb[order],
                    policy=policy, chunk_nbytes=int(chunk_nbytes), rank=rank, group_size=group_size)


def _check_no_overlap(ranges: list[CopyRange]) -> None:
    spans = sorted((r.dst_offset, r.dst_offset + r.nbytes) for r in ranges if r.nbytes)
    for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
        if b0 < a1:
            raise bad_arg("ranges", f"destinations [{a0}, {a1}) and [{b0}, {b1})", "non-overlapping destinations")


class PlanCache:
    """A small LRU cache of plans keyed by (layer shape, expert set, policy, chunk size).

    Plans hold relative offsets, so layers with the same shapes share one entry.
    """

    def __init__(self, maxsize: int = 256):
        self.maxsize = maxsize
        self._d: OrderedDict[Hashable, CopyPlan] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, build: Callable[[], CopyPlan]) -> CopyPlan:
        """Return the cached plan for ``key``, building it with ``build()`` on a miss."""
        plan = self._d.get(key)
        if plan is not None:
            self.hits += 1
            self._d.move_to_end(key)
            return plan
        self.misses += 1
        plan = build()
        self._d[key] = plan
        if len(self._d) > self.maxsize:
            self._d.popitem(last=False)
        return plan

    def __len__(self) -> int:
        return len(self._d)

    def plans(self) -> list[CopyPlan]:
        """The cached plans, least recently used first (a snapshot; the plans are shared, not copies)."""
        return list(self._d.values())

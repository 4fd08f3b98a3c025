"""Traffic patterns and copy schedules of the contention benchmark.

A **pattern** says which sources each rank pulls ``nbytes`` from (every source's region sits at
offset 0 of its heap; the destination holds one block per source, in ascending source order)::

    pair          rank 0 <- 1                     (the reference: one pair, alone)
    swap          0 <- 1, 1 <- 0
    ring          d <- d + 1                      (a permutation)
    all-to-one    d <- 0 for every d != 0         (source egress bound)
    one-from-all  0 <- s for every s != 0         (destination ingress bound)
    full          d <- s for every s != d         (a layer exchange: (G-1)/G of a layer per rank)

A **schedule** is a planner policy plus copy-engine options, written ``policy[+key=value...]`` or
by one of the names below. What rank ``d`` reads when, ``G = 4``, rank 0, a layer of 3 sources x 3
chunks (``1`` = a chunk of source 1; ``|`` marks separate copies where it matters)::

    naive        1 1 1 2 2 2 3 3 3     every rank reads the lowest source first: rank 0 reads 1
                                       while ranks 1, 2, 3 all read 0 (three readers, one source)
    rotated      1 1 1 2 2 2 3 3 3     rank d starts at d+1 (rank 1: 2 2 2 3 3 3 0 0 0): each phase
                                       is a permutation while ranks stay in step; one late rank
                                       makes the next phase collide
    round_robin  1 2 3 1 2 3 1 2 3     slot t reads source d+1+(t mod 3): every slot a permutation
                 |1|2|3|1|2|3|...      in lockstep; one cudaMemcpyAsync per chunk (~8.5 us each)
    batch        [1 2 3 1 2 3 1 2 3]   round_robin's copies in one cudaMemcpyBatchAsync per lane
                                       and job: one call instead of one per chunk
    parallel     lane 1: 1 1 1         one copy stream per source (rotated + streams = G-1), all
                 lane 2: 2 2 2         sources at once; each source's egress is shared by every
                 lane 3: 3 3 3         reader (more lanes than hardware queues share queues, in
                                       rotated order)
    tdm          time division on the copy plane only (round_robin + sync="slot"):
                   copy stream  [wait flag k-1][slot k: 1][flag k -> peers][wait flag k][slot k+1: 2]...
                   compute      ----- layer l ---- wait(prefetch done event) ---- layer l+1 -----
                 a copy stream waits on per-slot flags in symmetric memory (stream wait-value or
                 NVSHMEM signal operations), so each slot is a permutation even when ranks drift;
                 compute streams never wait on a flag, only on their own prefetch's done event
    tdm_source   like tdm, but slot k of source s waits only for the previous reader of s (a
                 token passed from reader to reader), not for the whole group

``parallel`` and the chunk options combine: ``parallel`` with a chunk size reads every source in
chunks on its own lane. The GPU copy engines implement every option (``sync`` since 041457e; a
``sync`` engine is created collectively); an engine that refuses an option (the sim engine takes
none) makes the benchmark report the row as skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import bad_arg
from ..planner import CopyPlan, CopyRange, make_plan, policies

__all__ = ["PATTERNS", "SCHEDULES", "Schedule", "parse_schedule", "canonical_pattern", "sources",
           "pattern_ranges", "recv_nbytes", "make_plans", "port_bound_time", "fill_options"]

PATTERNS = ("pair", "swap", "ring", "all-to-one", "one-from-all", "full")
_PATTERN_ALIASES = {"a2o": "all-to-one", "o2a": "one-from-all", "fx": "full", "full-exchange": "full",
                    "alltoone": "all-to-one", "onefromall": "one-from-all"}

# name -> (policy, engine options); "streams": "all" means G - 1.
SCHEDULES: dict[str, tuple[str, dict]] = {
    "naive": ("naive", {}),
    "rotated": ("rotated", {}),
    "round_robin": ("round_robin", {}),
    "batch": ("round_robin", {"api": "batch"}),
    "parallel": ("rotated", {"streams": "all"}),
    "tdm": ("round_robin", {"sync": "slot"}),
    "tdm_source": ("round_robin", {"sync": "source"}),
}


def canonical_pattern(name: str) -> str:
    """The canonical name of a pattern (aliases: a2o, o2a, fx, full-exchange)."""
    key = str(name).strip().lower().replace("_", "-")
    key = _PATTERN_ALIASES.get(key, key)
    if key not in PATTERNS:
        raise bad_arg("pattern", name, f"one of {list(PATTERNS)} (or a2o, o2a, fx)")
    return key


def sources(pattern: str, rank: int, group_size: int) -> list[int]:
    """The ranks ``rank`` pulls from under ``pattern``, ascending."""
    p, G = canonical_pattern(pattern), group_size
    if G < 2:
        raise bad_arg("group_size", G, "an int >= 2 for a traffic pattern")
    if not 0 <= rank < G:
        raise bad_arg("rank", rank, f"an int in [0, {G})")
    if p == "pair":
        return [1] if rank == 0 else []
    if p == "swap":
        return [1 - rank] if rank < 2 else []
    if p == "ring":
        return [(rank + 1) % G]
    if p == "all-to-one":
        return [0] if rank != 0 else []
    if p == "one-from-all":
        return [s for s in range(1, G)] if rank == 0 else []
    return [s for s in range(G) if s != rank]


def pattern_ranges(pattern: str, rank: int, group_size: int, nbytes: int) -> list[CopyRange]:
    """What ``rank`` pulls: ``nbytes`` at offset 0 of each source, block ``j`` of the destination
    for the ``j``-th source."""
    if nbytes <= 0:
        raise bad_arg("nbytes", nbytes, "an int > 0")
    return [CopyRange(s, 0, j * nbytes, nbytes) for j, s in enumerate(sources(pattern, rank, group_size))]


def recv_nbytes(pattern: str, rank: int, group_size: int, nbytes: int) -> int:
    """Bytes ``rank`` receives under ``pattern``."""
    return len(sources(pattern, rank, group_size)) * nbytes


def port_bound_time(pattern: str, group_size: int, nbytes: int, pair_Bps: float) -> float:
    """The least time any schedule needs when every GPU sends and receives at most ``pair_Bps``.

    The busiest port decides: for ``full`` and ``ring`` it is ``(bytes one rank pulls) / pair_Bps``,
    so the ideal aggregate is ``G x pair_Bps``; for ``all-to-one`` the source's egress decides.
    """
    G = group_size
    ingress = [recv_nbytes(pattern, r, G, nbytes) for r in range(G)]
    egress = [0] * G
    for r in range(G):
        for s in sources(pattern, r, G):
            egress[s] += nbytes
    return max(max(ingress), max(egress)) / pair_Bps


@dataclass(frozen=True)
class Schedule:
    """A planner policy plus copy-engine options.

    Attributes
    ----------
    name : str
        As written on the command line (aliases kept).
    policy : str
        A registered planner policy.
    options : dict
        Engine options; ``streams="all"`` stands for ``G - 1``.
    """

    name: str
    policy: str
    options: dict = field(default_factory=dict)

    def engine_options(self, group_size: int, base: dict | None = None) -> dict:
        """``base`` overridden by this schedule's options, ``streams="all"`` resolved."""
        return fill_options({**(base or {}), **self.options}, group_size)

    def plan(self, ranges: list[CopyRange], *, rank: int, group_size: int, chunk_nbytes: int) -> CopyPlan:
        """The plan of one rank; ``chunk_nbytes == 0`` means one copy per source range."""
        if chunk_nbytes == 0:
            chunk_nbytes = max((r.nbytes for r in ranges), default=1) or 1
        return make_plan(ranges, rank=rank, group_size=group_size, policy=self.policy, chunk_nbytes=chunk_nbytes)


def fill_options(options: dict, group_size: int) -> dict:
    """Resolve ``streams="all"`` to ``G - 1`` (at least 1)."""
    out = dict(options)
    if out.get("streams") == "all":
        out["streams"] = max(group_size - 1, 1)
    return out


def _value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    try:
        return int(low, 0)
    except ValueError:
        return text.strip()


def parse_option(text: str) -> tuple[str, Any]:
    """``"key=value"`` to ``(key, value)``; values become int or bool where they read as one."""
    if "=" not in text:
        raise bad_arg("engine option", text, "key=value, e.g. streams=3 or api=batch")
    k, v = text.split("=", 1)
    if not k.strip():
        raise bad_arg("engine option", text, "a non-empty key before '='")
    return k.strip(), _value(v)


def parse_schedule(spec: str) -> Schedule:
    """``"round_robin+api=batch+streams=3"`` or a name of :data:`SCHEDULES` (optionally followed by
    ``+key=value`` overrides) to a :class:`Schedule`."""
    parts = [p for p in str(spec).strip().split("+")]
    if not parts or not parts[0]:
        raise bad_arg("schedule", spec, "policy[+key=value...] or one of " + ", ".join(SCHEDULES))
    head = parts[0].strip()
    if head in SCHEDULES:
        policy, opts = SCHEDULES[head][0], dict(SCHEDULES[head][1])
    elif head in policies():
        policy, opts = head, {}
    else:
        raise bad_arg("schedule", spec, f"a name in {list(SCHEDULES)} or a planner policy in {policies()}")
    for p in parts[1:]:
        k, v = parse_option(p)
        opts[k] = v
    return Schedule(name=str(spec).strip(), policy=policy, options=opts)


def make_plans(pattern: str, schedule: Schedule, group_size: int, nbytes: int, chunk_nbytes: int) -> list[CopyPlan]:
    """Every rank's plan for one benchmark case."""
    return [schedule.plan(pattern_ranges(pattern, r, group_size, nbytes), rank=r, group_size=group_size,
                          chunk_nbytes=chunk_nbytes) for r in range(group_size)]

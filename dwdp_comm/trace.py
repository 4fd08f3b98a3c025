"""Chrome-trace / Perfetto JSON timelines of the copy plane, built from telemetry records.

One process per rank (``pid`` = rank), with these tracks (``tid``), top to bottom::

    compute stream       [ L3 ........................ ][ L4 ...
                         [wait]                          [wait]       exposed wait, nested in the layer
    prefetch slot 0      [ prefetch L5 ................. ]            the copy job (engine window)
    copies from rank 0     [ L5 <- r0 ........ ]                       per source, inside the job
    copies from rank 2         [ L5 <- r2 .............. ]

A layer's compute slice runs from its ``wait()`` to its ``release()`` on the consumer stream
(the work that read the prefetched weights); the prefetches it overlaps are the next layers'.
Slices that would overlap on one track (copies of one source on two lanes) go to a second track
of the same name. Times are microseconds from the earliest event of all ranks; ranks of one host
share its clock, ranks of several hosts are aligned on wall-clock time (as well as the hosts'
clocks agree). Open the file at https://ui.perfetto.dev or chrome://tracing.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

from .errors import bad_arg
from .telemetry import PrefetchRecord, Telemetry, format_nbytes

__all__ = ["chrome_trace", "write_trace", "COMPUTE_TID", "SLOT_TID", "SOURCE_TID"]

COMPUTE_TID = 1  # the consumer (compute) stream
SLOT_TID = 100  # + slot index: the copy jobs into that prefetch slot
SOURCE_TID = 1000  # + 10 x source rank (+ 1, 2, ... for overflow tracks): the copies from that source


def _as_telemetry(t) -> Telemetry:
    if isinstance(t, Telemetry):
        return t
    if isinstance(t, dict):
        return Telemetry.from_dict(t)
    raise bad_arg("telemetries", type(t).__name__, "Telemetry objects or their as_dict() forms")


class _Tracks:
    """Assigns slices to tracks so that slices on one track never partly overlap."""

    def __init__(self):
        self.ends: dict[tuple[int, int], float] = {}  # (pid, tid) -> end of its last slice
        self.names: dict[tuple[int, int], str] = {}

    def place(self, pid: int, base_tid: int, name: str, t0: float, t1: float) -> int:
        sub = 0
        while self.ends.get((pid, base_tid + sub), float("-inf")) > t0 + 1e-9:
            sub += 1
        tid = base_tid + sub
        self.ends[(pid, tid)] = t1
        self.names[(pid, tid)] = name if sub == 0 else f"{name} ({sub + 1})"
        return tid


def _slice(name: str, cat: str, pid: int, tid: int, t0: float, t1: float, origin: float, args: dict) -> dict:
    ts = (t0 - origin) * 1e6
    return {"name": name, "cat": cat, "ph": "X", "pid": pid, "tid": tid, "ts": ts,
            "dur": max(0.0, (t1 - origin) * 1e6 - ts), "args": args}


def _ms(s: float | None) -> float | None:
    return None if s is None else round(s * 1e3, 6)


def _gbps(g: float | None) -> float | None:
    return None if g is None else round(g, 4)


def chrome_trace(telemetries: Iterable[Telemetry | dict], *, title: str | None = None) -> dict:
    """A Chrome-trace (``{"traceEvents": [...]}``) of every rank's telemetry, merged.

    Parameters
    ----------
    telemetries : iterable of Telemetry (or their ``as_dict()`` forms)
        One per rank (distinct ranks).
    title : str, optional
        Stored under ``otherData``.

    Returns
    -------
    dict
        ``traceEvents``: ``"X"`` slices (``name``, ``cat``, ``ts``/``dur`` in microseconds, ``pid``
        = rank, ``tid`` = track, ``args``) and ``"M"`` metadata naming processes and tracks;
        ``displayTimeUnit``; ``otherData``.
    """
    tels = sorted((_as_telemetry(t) for t in telemetries), key=lambda t: t.rank)
    if not tels:
        raise bad_arg("telemetries", [], "at least one rank's Telemetry")
    if len({t.rank for t in tels}) != len(tels):
        raise bad_arg("telemetries", [t.rank for t in tels], "one Telemetry per rank (distinct ranks)")
    wall = len({t.host for t in tels}) > 1  # hosts' perf_counter clocks differ: align on wall-clock time
    shift = {t.rank: (t.clock_offset_s if wall else 0.0) for t in tels}
    times = [v + shift[t.rank] for t in tels for r in t.prefetches for v in
             (r.start_s, r.wait_start_s, *(s.start_s for s in r.sources)) if v is not None]
    origin = min(times) if times else 0.0
    tracks, events = _Tracks(), []
    for t in tels:
        pid, off = t.rank, shift[t.rank]
        events.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0,
                       "args": {"name": f"rank {t.rank} ({t.backend}, {t.host})"}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0, "args": {"sort_index": t.rank}})
        for r in t.prefetches:
            events.extend(_record_events(r, pid, off, origin, tracks))
    for (pid, tid), name in sorted(tracks.names.items()):
        events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": name}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid, "args": {"sort_index": tid}})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"title": title or "dwdp_comm telemetry", "ranks": [t.rank for t in tels],
                          "clock": "wall clock (several hosts)" if wall else "host perf_counter",
                          "timed_copies": all(t.timed for t in tels)}}


def _record_events(r: PrefetchRecord, pid: int, off: float, origin: float, tracks: _Tracks) -> list[dict]:
    out = []
    o = origin - off  # record times are on the rank's own clock
    if r.wait_start_s is not None and r.release_s is not None:
        t0, t1 = r.wait_start_s, max(r.release_s, r.wait_end_s or r.wait_start_s)
        tid = tracks.place(pid, COMPUTE_TID, "compute stream", t0, t1)
        out.append(_slice(r.name, "compute", pid, tid, t0, t1, o,
                          {"seq": r.seq, "layer": r.layer, "exposed_wait_ms": _ms(r.exposed_wait_s),
                           "prefetch_nbytes": r.nbytes}))
        if r.wait_end_s is not None and r.wait_end_s > r.wait_start_s:
            out.append(_slice(f"wait {r.name}", "exposed_wait", pid, tid, r.wait_start_s, r.wait_end_s, o,
                              {"seq": r.seq, "exposed_wait_ms": _ms(r.exposed_wait_s)}))
    if r.start_s is None or r.end_s is None:
        return out  # untimed engine: no copy window
    track = f"prefetch slot {r.slot}" if r.label is None else "copy jobs"  # labelled: a benchmark's jobs
    tid = tracks.place(pid, SLOT_TID + r.slot, track, r.start_s, r.end_s)
    out.append(_slice(f"prefetch {r.name}" if r.label is None else r.name, "prefetch", pid, tid, r.start_s, r.end_s, o,
                      {"seq": r.seq, "layer": r.layer, "slot": r.slot, "nbytes": r.nbytes,
                       "size": format_nbytes(r.nbytes), "copy_ms": _ms(r.copy_s), "GBps": _gbps(r.gbps),
                       "queued_ms": _ms(r.start_s - r.submit_s)}))
    for s in r.sources:
        if s.start_s is None or s.end_s is None:
            continue
        name = f"local copies (rank {s.src_rank})" if s.src_rank == r.rank else f"copies from rank {s.src_rank}"
        tid = tracks.place(pid, SOURCE_TID + 10 * s.src_rank, name, s.start_s, s.end_s)
        out.append(_slice(f"{r.name} <- r{s.src_rank}", "copy", pid, tid, s.start_s, s.end_s, o,
                          {"seq": r.seq, "layer": r.layer, "src_rank": s.src_rank, "nbytes": s.nbytes,
                           "size": format_nbytes(s.nbytes), "copy_ms": _ms(s.copy_s), "GBps": _gbps(s.gbps),
                           "lane": s.lane}))
    return out


def write_trace(path: str | os.PathLike, telemetries: Sequence[Telemetry | dict], *, title: str | None = None) -> dict:
    """Write :func:`chrome_trace` of ``telemetries`` to ``path`` (JSON); return the document."""
    doc = chrome_trace(telemetries, title=title)
    with open(path, "w") as fh:
        json.dump(doc, fh)
    return doc

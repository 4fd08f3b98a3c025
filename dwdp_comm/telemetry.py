"""Telemetry of the copy plane: what each prefetch pulled from each peer, how fast, and how long the
consumer waited for it.

Off by default; ``Prefetcher.enable_telemetry()`` / ``DwdpPipeline.enable_telemetry()`` (or their
``recording()`` context managers) turn it on. Per prefetch it records, per source rank, the bytes of
the plan and when the copy engine ran them (a timed engine fills a
:class:`~dwdp_comm.backends.base.JobTiming`), and on the consumer's stream two points around
``wait()`` (the exposed wait: how long the stream stalled on the prefetch) and one at ``release()``
(the end of the layer's work on the weights)::

    compute stream   ──[wait_start|exposed wait|wait_end]── layer's kernels ──[release]──
    copy engine      ═[start ═ copies from r0 ═╗═ copies from r2 ═══ end]═   (into the slot)

Nothing reads a point on the hot path: on GPUs points are CUDA timing events, read back a few
layers later (at each ``release()``, only those that already passed, never waiting) or at
``telemetry()`` (which blocks until the recorded work finished). On ``sim`` the points are host
times and the copy thread times its own copies. Times are seconds on the host's
``time.perf_counter`` clock (one clock for every process of a host); ``Telemetry.clock_offset_s``
converts to wall-clock time across hosts.

CUDA graphs: prefetches recorded in a capture are not recorded (their replays run without the
host); eager ones are.
"""

from __future__ import annotations

import contextlib
import platform
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator

from .backends.base import JobTiming, Timer
from .errors import bad_arg
from .checks import check_int
from .routing_histogram import RoutingHistogram

__all__ = ["SourceCopy", "PrefetchRecord", "Telemetry", "PrefetchRecorder", "recording", "format_nbytes",
           "empty_telemetry", "run_document"]


def format_nbytes(n: float) -> str:
    """``n`` bytes in the binary unit that fits (B, KiB, MiB, GiB)."""
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _rate(nbytes: int, seconds: float | None) -> float | None:
    return nbytes / seconds / 1e9 if seconds else None


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f} ms"


def _gbps(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.3g} GB/s"


@dataclass(frozen=True)
class SourceCopy:
    """The copies of one prefetch from one source rank.

    Attributes
    ----------
    src_rank : int
        The rank whose heap they read (this rank itself: local experts of gather-mode names).
    nbytes : int
        Bytes of the plan from that rank.
    start_s, end_s : float or None
        Host-clock seconds: before its first copy started, after its last one finished (None: the
        engine does not time jobs).
    copy_s : float or None
        How long its copies took: their summed durations where the engine knows them (``sim``),
        else the window ``end_s - start_s`` (GPUs; several sources on one copy lane have
        overlapping windows, so there each one's window covers the others' copies too).
    lane : int or None
        The copy stream (thread) its copies ran on.
    """

    src_rank: int
    nbytes: int
    start_s: float | None = None
    end_s: float | None = None
    copy_s: float | None = None
    lane: int | None = None

    @property
    def gbps(self) -> float | None:
        """``nbytes / copy_s`` in GB/s (1e9 bytes/s), or None without a copy time."""
        return _rate(self.nbytes, self.copy_s)


@dataclass(frozen=True)
class PrefetchRecord:
    """One prefetch: what its plan copied from each source, when, and how the consumer waited.

    Attributes
    ----------
    seq : int
        The prefetcher's count of ``prefetch()`` calls when it was issued (0-based).
    layer, slot, rank : int
    nbytes : int
        Bytes of its copy plan (equals ``sum(s.nbytes for s in sources)``).
    sources : tuple of SourceCopy
        One per source rank of the plan, ascending.
    issue_s, submit_s : float
        Host time of ``prefetch()`` and of the hand-over to the copy engine (later when the slot
        was still held).
    start_s, end_s : float or None
        The copy job could start (its ``after`` events passed) / finished (None: untimed engine).
    copy_s : float or None
        The copy job's duration (``end_s - start_s``, read directly between its two points).
    wait_start_s, wait_end_s : float or None
        The consumer stream reached ``wait()`` (first call) / passed it (last call); None when
        never waited.
    exposed_wait_s : float or None
        How long the consumer stream stalled in ``wait()`` (summed over calls; >= 0).
    release_s : float or None
        The consumer stream reached ``release()`` (its work on the weights was done).
    label : str or None
        A name for traces (default ``"L<layer>"``).
    error : str or None
        The copy engine's error, when the job failed.
    """

    seq: int
    layer: int
    slot: int
    rank: int
    nbytes: int
    sources: tuple[SourceCopy, ...]
    issue_s: float
    submit_s: float
    start_s: float | None = None
    end_s: float | None = None
    copy_s: float | None = None
    wait_start_s: float | None = None
    wait_end_s: float | None = None
    exposed_wait_s: float | None = None
    release_s: float | None = None
    label: str | None = None
    error: str | None = None

    @property
    def gbps(self) -> float | None:
        """``nbytes / copy_s`` in GB/s."""
        return _rate(self.nbytes, self.copy_s)

    @property
    def name(self) -> str:
        """The name in traces and summaries: ``label``, else ``"L<layer>"``."""
        return self.label or f"L{self.layer}"

    def summary(self) -> str:
        """One line: layer, bytes, copy time and rate, exposed wait, then per source."""
        peers = " | ".join(f"r{s.src_rank}{'(local)' if s.src_rank == self.rank else ''} {format_nbytes(s.nbytes)} "
                           f"{_ms(s.copy_s)} {_gbps(s.gbps)}" for s in self.sources)
        return (f"{self.name} (prefetch {self.seq}, slot {self.slot}): {format_nbytes(self.nbytes)} in "
                f"{_ms(self.copy_s)} ({_gbps(self.gbps)}), exposed wait {_ms(self.exposed_wait_s)}"
                + (f" | {peers}" if peers else "") + (f" | ERROR {self.error}" if self.error else ""))

    def as_dict(self) -> dict:
        """JSON-ready form (sources as a list of dicts)."""
        d = asdict(self)
        d["sources"] = [asdict(s) for s in self.sources]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PrefetchRecord":
        """The record of an :meth:`as_dict` form."""
        return cls(**{**d, "sources": tuple(SourceCopy(**s) for s in d["sources"])})


@dataclass
class Telemetry:
    """One rank's telemetry: its prefetch records (oldest first) and its routing histogram.

    Attributes
    ----------
    rank, group_size : int
    backend : str
    host : str
        ``platform.node()``: ranks of one host share the ``perf_counter`` clock.
    clock_offset_s : float
        ``time.time() - time.perf_counter()`` on this host (wall clock = host clock + offset).
    timed : bool
        Whether the copy engine timed its copies (else the copy times are None).
    prefetches : list of PrefetchRecord
        Released prefetches (a handle still held is reported by a later call).
    routing : RoutingHistogram or None
        Expert choices per layer (``enable_telemetry(routing=True)`` of a pipeline).
    dropped : int
        Records dropped because more than ``max_records`` were kept.
    cancelled : int
        Prefetches released before they were submitted (they copied nothing).
    """

    rank: int
    group_size: int
    backend: str
    host: str
    clock_offset_s: float
    timed: bool
    prefetches: list[PrefetchRecord] = field(default_factory=list)
    routing: RoutingHistogram | None = None
    dropped: int = 0
    cancelled: int = 0

    def layers(self) -> dict[int, dict]:
        """Per layer: ``prefetches``, ``nbytes``, ``copy_s``, ``gbps``, ``exposed_wait_s``,
        ``max_exposed_wait_s`` and ``sources`` (``{src_rank: {"nbytes", "copy_s", "gbps"}}``),
        summed over the layer's records (times over the timed ones)."""
        out: dict[int, dict] = {}
        for r in self.prefetches:
            acc = out.setdefault(r.layer, {"prefetches": 0, "nbytes": 0, "copy_s": None, "exposed_wait_s": 0.0,
                                           "max_exposed_wait_s": 0.0, "sources": {}, "_timed_nbytes": 0})
            acc["prefetches"] += 1
            acc["nbytes"] += r.nbytes
            if r.copy_s is not None:
                acc["copy_s"] = (acc["copy_s"] or 0.0) + r.copy_s
                acc["_timed_nbytes"] += r.nbytes
            acc["exposed_wait_s"] += r.exposed_wait_s or 0.0
            acc["max_exposed_wait_s"] = max(acc["max_exposed_wait_s"], r.exposed_wait_s or 0.0)
            for s in r.sources:
                src = acc["sources"].setdefault(s.src_rank, {"nbytes": 0, "copy_s": None, "_timed_nbytes": 0})
                src["nbytes"] += s.nbytes
                if s.copy_s is not None:
                    src["copy_s"] = (src["copy_s"] or 0.0) + s.copy_s
                    src["_timed_nbytes"] += s.nbytes
        for acc in out.values():
            acc["gbps"] = _rate(acc.pop("_timed_nbytes"), acc["copy_s"])
            for src in acc["sources"].values():
                src["gbps"] = _rate(src.pop("_timed_nbytes"), src["copy_s"])
        return dict(sorted(out.items()))

    def summary_lines(self) -> list[str]:
        """One line per layer (the sums of :meth:`layers`)."""
        lines = []
        for layer, a in self.layers().items():
            n = a["prefetches"]
            peers = " | ".join(f"r{s}{'(local)' if s == self.rank else ''} {format_nbytes(v['nbytes'] / n)} "
                               f"{_gbps(v['gbps'])}" for s, v in sorted(a["sources"].items()))
            lines.append(f"rank {self.rank} layer {layer}: {n} prefetch{'es' if n != 1 else ''}, "
                         f"{format_nbytes(a['nbytes'] / n)} each, {_gbps(a['gbps'])}, exposed wait "
                         f"{_ms(a['exposed_wait_s'])} (max {_ms(a['max_exposed_wait_s'])})"
                         + (f" | {peers}" if peers else ""))
        return lines

    def as_dict(self) -> dict:
        """JSON-ready form (``"format": "dwdp-telemetry"``, version 1)."""
        d = {"format": "dwdp-telemetry", "version": 1}
        d.update({k: v for k, v in asdict(self).items() if k not in ("prefetches", "routing")})
        d["prefetches"] = [r.as_dict() for r in self.prefetches]
        d["routing"] = None if self.routing is None else self.routing.as_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Telemetry":
        """The telemetry of an :meth:`as_dict` form (raises InvalidArgumentError for anything else)."""
        if not isinstance(d, dict) or d.get("format") != "dwdp-telemetry":
            raise bad_arg("telemetry", type(d).__name__ if not isinstance(d, dict) else d.get("format"),
                          "a dict of format 'dwdp-telemetry' (Telemetry.as_dict())")
        kw = {k: v for k, v in d.items() if k not in ("format", "version", "prefetches", "routing")}
        routing = d.get("routing")
        return cls(**kw, prefetches=[PrefetchRecord.from_dict(r) for r in d.get("prefetches", [])],
                   routing=None if routing is None else RoutingHistogram.from_dict(routing))


class _Open:
    """A prefetch being recorded: time points not read back yet."""

    __slots__ = ("seq", "layer", "slot", "issue_s", "submit_s", "sources", "nbytes", "ready", "timing", "waits",
                 "release", "released", "label")

    def __init__(self, seq: int, layer: int, slot: int, label: str | None):
        self.seq, self.layer, self.slot, self.label = seq, layer, slot, label
        self.issue_s = time.perf_counter()
        self.submit_s = None
        self.sources: dict[int, int] = {}
        self.nbytes = 0
        self.ready = self.timing = self.release = None
        self.waits: list[tuple[Any, Any]] = []
        self.released = False


class PrefetchRecorder:
    """The record keeper behind ``Prefetcher.enable_telemetry()`` (one per prefetcher).

    The prefetcher calls :meth:`open` at ``prefetch()``, :meth:`submitting` / :meth:`submitted`
    around the engine's ``submit``, :meth:`mark` around ``wait()`` and :meth:`released` at
    ``release()``; none blocks. Local; not thread-safe (the prefetcher's thread only).

    Parameters
    ----------
    timer : Timer
        The backend's clock (``Backend.timer()``).
    rank, group_size : int
    backend : str
    max_records : int
        Resolved records kept (the oldest are dropped and counted beyond it).
    """

    def __init__(self, timer: Timer, rank: int, group_size: int, backend: str, max_records: int = 100_000):
        if not isinstance(timer, Timer):
            raise bad_arg("timer", type(timer).__name__, "a dwdp_comm.backends.base.Timer")
        self.timer, self.rank, self.group_size, self.backend = timer, rank, group_size, backend
        self.max_records = check_int("max_records", max_records, low=1)
        self.timed = False
        self._pending: deque[_Open] = deque()
        self._done: deque[PrefetchRecord] = deque()
        self._plan_sources: dict[int, tuple[Any, dict[int, int]]] = {}  # id(plan) -> (plan, bytes per source)
        self.dropped = self.cancelled = 0
        self._offset = time.time() - time.perf_counter()

    def set_max_records(self, max_records: int) -> None:
        """Keep at most ``max_records`` resolved records from now on (the oldest are dropped)."""
        self.max_records = check_int("max_records", max_records, low=1)
        while len(self._done) > self.max_records:
            self._done.popleft()
            self.dropped += 1

    # ---- hooks of the prefetcher (hot path: no host synchronisation) ----------------------------
    def open(self, seq: int, layer: int, slot: int, label: str | None = None) -> _Open:
        """At ``prefetch()``: a new record (host time of the call noted)."""
        rec = _Open(seq, layer, slot, label)
        self._pending.append(rec)
        return rec

    def submitting(self, rec: _Open, plan, timed_engine: bool) -> JobTiming | None:
        """Before ``submit``: note the plan's bytes; return the JobTiming to pass when the engine is timed."""
        hit = self._plan_sources.get(id(plan))
        if hit is None or hit[0] is not plan:
            hit = (plan, plan.nbytes_by_source())  # the plan cache hands out the same plan objects
            self._plan_sources[id(plan)] = hit
            if len(self._plan_sources) > 256:
                self._plan_sources.pop(next(iter(self._plan_sources)))
        rec.sources, rec.nbytes = hit[1], plan.total_nbytes
        rec.submit_s = time.perf_counter()
        self.timed = self.timed or timed_engine
        rec.timing = JobTiming(self.timer) if timed_engine else None
        return rec.timing

    def submitted(self, rec: _Open, ready) -> None:
        """After ``submit``: the job's done event (its completion tells when the times can be read)."""
        rec.ready = ready

    def mark(self, stream: Any = None) -> Any:
        """A time point on ``stream`` (around ``wait()``)."""
        return self.timer.mark(stream=stream)

    def waited(self, rec: _Open, before: Any, after: Any) -> None:
        """The consumer's points around one ``wait()``."""
        rec.waits.append((before, after))

    def released(self, rec: _Open, stream: Any = None) -> None:
        """At ``release()``: mark the consumer stream, then read back what already passed."""
        if rec.submit_s is None:
            self.cancelled += 1
            self._pending.remove(rec)
            return
        rec.release = self.timer.mark(stream=stream)
        rec.released = True
        self.drain(block=False)

    def finished(self, rec: _Open) -> None:
        """A record without a consumer (a benchmark's copy job) is complete once submitted."""
        rec.released = True
        self.drain(block=False)

    # ---- reading back --------------------------------------------------------------------------
    def drain(self, block: bool) -> None:
        """Resolve released records. Without ``block``: oldest first, stopping at the first that is
        not released or whose work has not finished (never waits). With ``block``: every released
        one (waits for their work)."""
        if not block:
            while self._pending and self._pending[0].released:
                rec = self._pending[0]
                if not ((rec.release is None or self.timer.is_done(rec.release))
                        and (rec.ready is None or rec.ready.is_done)):
                    return
                self._pending.popleft()
                self._keep(self._resolve(rec))
            return
        held = deque()
        while self._pending:
            rec = self._pending.popleft()
            if rec.released:
                self._keep(self._resolve(rec))
            else:
                held.append(rec)
        self._pending = held

    def _keep(self, record: PrefetchRecord) -> None:
        self._done.append(record)
        while len(self._done) > self.max_records:
            self._done.popleft()
            self.dropped += 1

    def _resolve(self, rec: _Open) -> PrefetchRecord:
        error = None
        try:
            if rec.ready is not None:
                rec.ready.synchronize()
        except Exception as exc:  # the consumer saw it at wait(); keep the record, say why it has no times
            error = f"{type(exc).__name__}: {exc}"
        t = self.timer

        def window(start, end) -> tuple:
            """(start s, end s, duration s) of a window whose ends may be tuples of points: the earliest
            start, the latest end; the duration read directly between those two points."""
            if start is None or end is None:
                return None, None, None
            starts = [(t.seconds(p), i, p) for i, p in enumerate(_points(start))]
            ends = [(t.seconds(p), i, p) for i, p in enumerate(_points(end))]
            (s0, _, p0), (s1, _, p1) = min(starts), max(ends)
            return s0, s1, t.elapsed(p0, p1)

        sec = (lambda p: None if p is None else t.seconds(p))
        times = rec.timing.sources if rec.timing is not None and error is None else {}
        sources = []
        for src, nbytes in sorted(rec.sources.items()):
            start, end, busy, lane = times.get(src, (None, None, None, None))
            s0, s1, span = window(start, end)
            sources.append(SourceCopy(src, nbytes, s0, s1, busy if busy is not None else span, lane))
        timing = rec.timing if error is None else None
        j0, j1, job = window(timing.start, timing.end) if timing else (None, None, None)
        out = PrefetchRecord(
            seq=rec.seq, layer=rec.layer, slot=rec.slot, rank=self.rank, nbytes=rec.nbytes, sources=tuple(sources),
            issue_s=rec.issue_s, submit_s=rec.submit_s, start_s=j0, end_s=j1, copy_s=job,
            wait_start_s=sec(rec.waits[0][0]) if rec.waits else None,
            wait_end_s=sec(rec.waits[-1][1]) if rec.waits else None,
            exposed_wait_s=sum(max(0.0, t.elapsed(b, a)) for b, a in rec.waits) if rec.waits else None,
            release_s=sec(rec.release), label=rec.label, error=error)
        points = [rec.release, *(p for w in rec.waits for p in w)]
        if rec.timing is not None:
            points += [*_points(rec.timing.start), *_points(rec.timing.end),
                       *(q for v in rec.timing.sources.values() for p in v[:2] for q in _points(p))]
        for p in {id(p): p for p in points if p is not None}.values():  # sources may share a lane's points
            t.free(p)
        return out

    def telemetry(self, reset: bool = False, routing: RoutingHistogram | None = None) -> Telemetry:
        """Every released record (blocks until their recorded work finished). ``reset`` forgets them."""
        self.drain(block=True)
        out = Telemetry(rank=self.rank, group_size=self.group_size, backend=self.backend, host=platform.node(),
                        clock_offset_s=self._offset, timed=self.timed,
                        prefetches=sorted(self._done, key=lambda r: r.seq), routing=routing,
                        dropped=self.dropped, cancelled=self.cancelled)
        if reset:
            self._done.clear()
            self.dropped = self.cancelled = 0
        return out


def _points(p: Any) -> tuple:
    """A JobTiming point or tuple of points as a tuple (empty for None)."""
    return () if p is None else p if isinstance(p, tuple) else (p,)


def empty_telemetry(rank: int, group_size: int, backend: str) -> Telemetry:
    """The telemetry of a prefetcher that never recorded: no records."""
    return Telemetry(rank=rank, group_size=group_size, backend=backend, host=platform.node(),
                     clock_offset_s=time.time() - time.perf_counter(), timed=False)


def run_document(telemetries: Iterable[Telemetry | dict]) -> dict:
    """A telemetry file of a whole run: every rank's :meth:`Telemetry.as_dict` and the ranks' routing
    histograms merged (``"routing"``: the form :func:`dwdp_comm.routing_histogram.load` reads; None
    when no rank recorded routing)."""
    tels = [t if isinstance(t, Telemetry) else Telemetry.from_dict(t) for t in telemetries]
    hists = [t.routing for t in tels if t.routing is not None]
    return {"format": "dwdp-telemetry-run", "version": 1, "ranks": [t.as_dict() for t in tels],
            "routing": RoutingHistogram.merge(hists).as_dict() if hists else None}


@contextlib.contextmanager
def recording(target: Any, **options: Any) -> Iterator[Any]:
    """``with recording(pf_or_pipe, **options):`` enables telemetry on entry, disables it on exit
    (the records stay: read them with ``target.telemetry()``)."""
    was = target.telemetry_enabled
    target.enable_telemetry(**options)
    try:
        yield target
    finally:
        if not was:
            target.disable_telemetry()

"""Runs the contention cases: on the ranks of a real backend, or through the model.

A **case** is (pattern, schedule, chunk, bytes per source). For each size the runner first
measures the **pair reference** (rank 0 pulls ``nbytes`` from rank 1 as one copy, alone), whose
rate defines the ideal: the port bound of the pattern at that rate
(:func:`~dwdp_comm.bench.patterns.port_bound_time`; for the full exchange ``G x pair``).

Measurement method (real backends)
----------------------------------
Every iteration: a host barrier; then each rank delays the start of its copies by
``base + skew_r`` (on GPUs with a sleep kernel on a side stream, so the host is never the thing
delayed and has issued every copy before the sleep ends; on ``sim`` with a host sleep), records a
start mark, submits its plan with the start mark as ``after``, and records an end mark after the
plan's done event (CUDA events on GPUs, ``time.perf_counter`` on ``sim``). A rank's time is
end - its own start. The row's time is the largest rank time of an iteration, averaged over the
timed iterations. With no skew, ranks start within the host barrier's spread (tens of
microseconds), which this method cannot remove; use sizes whose transfer takes milliseconds.

Every byte is checked: each source region holds a rank- and offset-dependent pattern of 32-bit
words; before the last timed iteration the destination is poisoned (0xA5), after it every byte of
every pulled block is compared with the pattern of its source, on the device that holds it.
``#wrong`` is the number of differing bytes, summed over ranks.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..errors import DwdpError, InvalidArgumentError, InvalidTypeError, bad_arg
from ..telemetry import PrefetchRecorder
from . import model as M
from .patterns import (Schedule, canonical_pattern, make_plans, parse_schedule, pattern_ranges,
                       port_bound_time, recv_nbytes, sources)

__all__ = ["BenchConfig", "Case", "cases", "fill_pattern", "count_wrong", "run_rank", "run_model",
           "row_metrics", "timeline_of", "without_ideal"]

_POISON = 0xA5
_WORDS_PER_PIECE = 1 << 24  # 64 MiB of int32 words per fill / check step
_MUL, _ADD = 0x9E3779B1, 0x85EBCA77


@dataclass
class BenchConfig:
    """Everything one benchmark run needs (picklable; sent to every rank).

    Attributes
    ----------
    group_size : int
    sizes : list of int
        Bytes per source.
    chunks : list of int
        Chunk sizes; 0 means one copy per source.
    schedules, patterns : list of str
    skew : float
        0: ranks start together; x > 0: each rank starts at a uniform random time in
        ``[0, x * ideal time of the case]``, drawn per iteration.
    iters, warmup : int
    engine_options : dict
        Options for every schedule (a schedule's own options override them).
    seed : int
    inject_corruption : bool
        ``sim`` only: flip one byte of the first copy of every job (``corrupt_copy=0``).
    backend : str
        Requested backend (``model`` runs in-process).
    fabric, executor, arbitration, issue_order : str
        Model backend only.
    timeline : bool
        Keep per-copy timelines (model) for the plot.
    trace : bool
        Record every copy job's telemetry (real backends with a timed engine) for a trace.
    model_method : {"auto", "event"}
        Model backend only: :func:`~dwdp_comm.bench.model.simulate`'s ``method``.
    """

    group_size: int
    sizes: list
    chunks: list
    schedules: list
    patterns: list
    skew: float = 0.0
    iters: int = 5
    warmup: int = 1
    engine_options: dict = field(default_factory=dict)
    seed: int = 0
    inject_corruption: bool = False
    backend: str = "auto"
    fabric: str = "auto"
    executor: str = "per_stream"
    arbitration: str = "fair"
    issue_order: str = "stream"
    timeline: bool = False
    trace: bool = False
    model_method: str = "auto"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Case:
    pattern: str
    schedule: Schedule
    chunk_nbytes: int
    nbytes: int


def cases(cfg: BenchConfig) -> list[Case]:
    """Cases in output order: by size, then pattern, schedule, chunk."""
    scheds = [parse_schedule(s) for s in cfg.schedules]
    pats = [canonical_pattern(p) for p in cfg.patterns]
    return [Case(p, s, c, n) for n in cfg.sizes for p in pats for s in scheds for c in cfg.chunks]


# ---- byte patterns --------------------------------------------------------------------------------
def _words(rank: int, seed: int, start: int, stop: int, device) -> torch.Tensor:
    w = torch.arange(start, stop, dtype=torch.int64, device=device)
    v = (w * _MUL + (rank + 1) * _ADD + seed * 0x27D4EB2F) & 0xFFFFFFFF
    return torch.where(v >= 1 << 31, v - (1 << 32), v).to(torch.int32)


def fill_pattern(region: torch.Tensor, rank: int, seed: int) -> None:
    """Fill a ``uint8`` tensor (length a multiple of 4) with rank ``rank``'s word pattern."""
    n = region.numel()
    if n % 4:
        raise bad_arg("region", f"{n} bytes", "a multiple of 4 bytes")
    words = region.view(torch.int32)
    for a in range(0, n // 4, _WORDS_PER_PIECE):
        b = min(a + _WORDS_PER_PIECE, n // 4)
        words[a:b].copy_(_words(rank, seed, a, b, region.device))


def count_wrong(block: torch.Tensor, src_rank: int, seed: int) -> int:
    """Bytes of ``block`` (``uint8``, a pulled copy of ``src_rank``'s region) that differ from the
    pattern; compared where ``block`` lives."""
    n = block.numel()
    if n % 4:
        raise bad_arg("block", f"{n} bytes", "a multiple of 4 bytes")
    wrong = 0
    for a in range(0, n // 4, _WORDS_PER_PIECE):
        b = min(a + _WORDS_PER_PIECE, n // 4)
        want = _words(src_rank, seed, a, b, block.device).view(torch.uint8)
        wrong += int((block[4 * a:4 * b] != want).sum().item())
    return wrong


# ---- metrics --------------------------------------------------------------------------------------
def row_metrics(case: Case, group_size: int, times_s: list[float], pair_Bps: float) -> dict:
    """Time and bandwidth columns of one row from its per-iteration times (seconds)."""
    G, n = group_size, case.nbytes
    recv = [recv_nbytes(case.pattern, r, G, n) for r in range(G)]
    total, most = sum(recv), max(recv)
    t = float(np.mean(times_s))
    t_ideal = port_bound_time(case.pattern, G, n, pair_Bps)
    return {"time_us": 1e6 * t, "time_min_us": 1e6 * float(np.min(times_s)),
            "time_max_us": 1e6 * float(np.max(times_s)), "times_us": [1e6 * x for x in times_s],
            "total_nbytes": total, "max_rank_nbytes": most,
            "rank_GBps": most / t / 1e9, "agg_GBps": total / t / 1e9, "pair_GBps": pair_Bps / 1e9,
            "ideal_GBps": total / t_ideal / 1e9, "pct_ideal": 100.0 * t_ideal / t}


def without_ideal(row: dict) -> dict:
    """Drop the ideal columns of a ``sim`` row (in place): CPU copy threads share one memory system,
    so the pattern's port bound at the pair rate (one small copy, alone) bounds nothing there; the
    ratio read 106-313 %. Rows keep time and GB/s; ``ideal_GBps`` and ``pct_ideal`` become None."""
    row["ideal_GBps"] = None
    row["pct_ideal"] = None
    return row


def _row_base(case: Case, G: int, base_options: dict) -> dict:
    return {"pattern": case.pattern, "schedule": case.schedule.name, "policy": case.schedule.policy,
            "options": case.schedule.engine_options(G, base_options), "chunk_nbytes": case.chunk_nbytes,
            "nbytes": case.nbytes, "status": "ok", "reason": None, "wrong": None}


def _skews(cfg: BenchConfig, case_index: int, G: int, t_ideal: float, count: int) -> np.ndarray:
    """``[count, G]`` start delays in seconds, the same on every rank (seeded)."""
    if cfg.skew <= 0:
        return np.zeros((count, G))
    rng = np.random.default_rng([cfg.seed, case_index])
    return rng.uniform(0.0, cfg.skew * t_ideal, size=(count, G))


# ---- the model ------------------------------------------------------------------------------------
def model_fabric(cfg: BenchConfig) -> M.Fabric:
    """The fabric of ``cfg``: ``h200`` up to 8 GPUs and ``nvl72`` above when ``fabric == "auto"``."""
    G = cfg.group_size
    name = cfg.fabric if cfg.fabric != "auto" else ("h200" if G <= 8 else "nvl72")
    if name == "h200":
        return M.h200(G)
    if name == "nvl72":
        return M.nvl72(G)
    raise bad_arg("fabric", cfg.fabric, "'auto', 'h200' or 'nvl72'")


def timeline_of(res: M.SimResult) -> list[list]:
    """``[rank, lane, src, t_data_us, t_end_us]`` per copy that moved bytes (for the plot)."""
    r = res.records
    keep = r["nbytes"] > 0
    return [[int(a), int(b), int(c), round(1e6 * d, 3), round(1e6 * e, 3)] for a, b, c, d, e in
            zip(r["rank"][keep], r["lane"][keep], r["src"][keep], r["t_data"][keep], r["t_end"][keep])]


def run_model(cfg: BenchConfig, on_row: Callable[[dict], None] | None = None,
              on_reference: Callable[[int, float], None] | None = None) -> dict:
    """Every case through the model (in this process). Returns ``{"rows", "pair_reference", ...}``."""
    if cfg.inject_corruption:
        raise bad_arg("inject_corruption", True, "False on the model backend", "it moves no bytes; use --backend sim")
    fabric = model_fabric(cfg)
    G = cfg.group_size
    rows, refs = [], {}
    sim = dict(executor=cfg.executor, arbitration=cfg.arbitration, issue_order=cfg.issue_order,
               method=cfg.model_method)
    plans_of: dict[tuple, list] = {}  # schedules of one policy share a size's plans
    for idx, case in enumerate(cases(cfg)):
        if case.nbytes not in refs:
            refs[case.nbytes] = M.pair_rate(fabric, case.nbytes)
            if on_reference:
                on_reference(case.nbytes, refs[case.nbytes])
        row = _row_base(case, G, cfg.engine_options)
        try:
            key = (case.pattern, case.schedule.policy, case.nbytes, case.chunk_nbytes)
            if key not in plans_of:
                plans_of = {k: v for k, v in plans_of.items() if k[2] == case.nbytes}  # sizes come in order
                plans_of[key] = make_plans(case.pattern, case.schedule, G, case.nbytes, case.chunk_nbytes)
            plans = plans_of[key]
            M.parse_options(row["options"])
        except (InvalidArgumentError, InvalidTypeError) as exc:
            row.update(status="skipped", reason=str(exc))
            rows.append(row)
            if on_row:
                on_row(row)
            continue
        t_ideal = port_bound_time(case.pattern, G, case.nbytes, refs[case.nbytes])
        draws = _skews(cfg, idx, G, t_ideal, cfg.iters) if cfg.skew > 0 else np.zeros((1, G))
        times, first = [], None
        for st in draws:
            try:
                res = M.simulate(plans, fabric, options=row["options"], starts=st, **sim)
            except (InvalidArgumentError, InvalidTypeError) as exc:
                row.update(status="skipped", reason=str(exc))
                break
            first = first or res
            times.append(float(res.durations.max()))
        if row["status"] == "ok":
            row.update(row_metrics(case, G, times, refs[case.nbytes]), iters=len(times))
            if cfg.timeline and first is not None:
                row["timeline"] = timeline_of(first)
        rows.append(row)
        if on_row:
            on_row(row)
    return {"rows": rows, "pair_reference": {str(k): v / 1e9 for k, v in refs.items()},
            "model": {"fabric": fabric.as_dict(), **sim}, "backend": "model",
            "backend_reason": "requested (a fluid model; no bytes move)", "group_size": G}


# ---- real backends --------------------------------------------------------------------------------
class _HostClock:
    """sim: the host is the only stream; delays are host sleeps, marks are perf_counter()."""

    def __init__(self, group):
        self.group = group

    def begin(self, delay_s: float):
        if delay_s > 0:
            time.sleep(delay_s)
        return time.perf_counter(), []

    def end(self, done):
        done.synchronize()
        return time.perf_counter()

    def elapsed(self, t0, t1) -> float:
        return t1 - t0

    def sync(self) -> None:
        pass


class _CudaClock:
    """GPUs: a sleep kernel on a side stream delays the copies; CUDA events mark start and end."""

    def __init__(self, group):
        self.group = group
        self.device = group.device
        self.side = torch.cuda.Stream(device=self.device)
        self.cycles_per_s = self._calibrate()

    def _calibrate(self) -> float:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cycles = 20_000_000
        with torch.cuda.stream(self.side):
            torch.cuda._sleep(1000)  # warm the kernel up
            a.record(self.side)
            torch.cuda._sleep(cycles)
            b.record(self.side)
        b.synchronize()
        return cycles / (a.elapsed_time(b) / 1e3)

    def begin(self, delay_s: float):
        e0 = torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.side):
            if delay_s > 0:
                torch.cuda._sleep(max(1, int(delay_s * self.cycles_per_s)))
            e0.record(self.side)
        return e0, [self.group.impl.record_event(stream=self.side)]

    def end(self, done):
        done.wait(stream=self.side)
        e1 = torch.cuda.Event(enable_timing=True)
        e1.record(self.side)
        return e1

    def elapsed(self, e0, e1) -> float:
        e1.synchronize()
        return e0.elapsed_time(e1) / 1e3

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)


def run_rank(group, cfg: BenchConfig, on_row: Callable[[dict], None] | None = None,
             on_reference: Callable[[int, float], None] | None = None) -> dict:
    """Collective: run every case on this rank of ``group``; every rank returns the same rows.

    ``on_row`` / ``on_reference`` are called on rank 0 only, as rows complete.
    """
    G, rank = group.size, group.rank
    if cfg.group_size != G:
        raise bad_arg("group_size", cfg.group_size, f"the group's size {G}")
    if cfg.inject_corruption and group.backend != "sim":
        raise bad_arg("inject_corruption", True, "the sim backend", f"the group runs {group.backend!r}")
    impl = group.impl
    on_gpu = group.device.type == "cuda"
    clock = _CudaClock(group) if on_gpu else _HostClock(group)
    maxn = max(cfg.sizes)
    heap = impl.alloc_symmetric(maxn)
    dst = impl.alloc_buffer(max(G - 1, 1) * maxn)
    engines: dict[tuple, Any] = {}
    rows, refs = [], {}
    timer = impl.timer() if cfg.trace else None
    tel = PrefetchRecorder(timer, rank, G, group.backend) if timer is not None else None
    try:
        fill_pattern(heap.local.tensor(0, maxn), rank, cfg.seed)
        clock.sync()
        group.barrier()
        for idx, case in enumerate(cases(cfg)):
            if case.nbytes not in refs:
                # the plain single copy, whatever -o says
                ref_case = Case("pair", parse_schedule("naive"), 0, case.nbytes)
                ref = _measure(group, cfg, ref_case, -1, engines, heap, dst, clock, None, check=False, base_options={})
                if ref["status"] != "ok":
                    raise DwdpError(f"the pair reference (one copy, default engine) cannot run: {ref['reason']}")
                refs[case.nbytes] = ref["nbytes"] * ref["iters"] / sum(ref["_times"])
                if rank == 0 and on_reference:
                    on_reference(case.nbytes, refs[case.nbytes])
            row = _measure(group, cfg, case, idx, engines, heap, dst, clock, refs[case.nbytes], tel=tel)
            row.pop("_times", None)
            if group.backend == "sim" and row["status"] == "ok":
                without_ideal(row)
            rows.append(row)
            if rank == 0 and on_row:
                on_row(row)
    finally:
        for eng in engines.values():
            if not isinstance(eng, str):
                eng.close()
        clock.sync()
        group.barrier()
        dst.close()
        heap.close()
    out = {"rows": rows, "pair_reference": {str(k): v / 1e9 for k, v in refs.items()},
           "backend": group.backend, "backend_reason": group.backend_reason, "group_size": G,
           "device": str(group.device)}
    if cfg.trace:  # collective: every rank's records, for rank 0's trace file
        out["telemetry"] = group.comm.all_gather_object(tel.telemetry().as_dict() if tel else None)
    return out


def _engine(group, heap, opts: dict, cfg: BenchConfig, engines: dict):
    key = tuple(sorted(opts.items()))
    if key not in engines:
        extra = {"corrupt_copy": 0} if cfg.inject_corruption else {}
        try:
            engines[key] = group.impl.copy_engine(heap, **opts, **extra)
            err = None
        except (InvalidArgumentError, InvalidTypeError) as exc:
            engines[key], err = str(exc), str(exc)
        err = group.comm.agreed_error(err, "dwdp-bench contention: creating a copy engine")
        if err is not None and not isinstance(engines[key], str):
            engines[key].close()
            engines[key] = err
    return engines[key]


def _measure(group, cfg, case: Case, idx: int, engines, heap, dst, clock, pair_Bps, check=True,
             base_options: dict | None = None, tel: PrefetchRecorder | None = None) -> dict:
    G, rank = group.size, group.rank
    row = _row_base(case, G, cfg.engine_options if base_options is None else base_options)
    plan = case.schedule.plan(pattern_ranges(case.pattern, rank, G, case.nbytes), rank=rank, group_size=G,
                              chunk_nbytes=case.chunk_nbytes)
    eng = _engine(group, heap, row["options"], cfg, engines)
    if isinstance(eng, str):
        row.update(status="skipped", reason=eng)
        return row
    api = getattr(eng, "api", None)  # the GPU executor falls back from "batch" to "memcpy" (and says why)
    if api is not None and api != row["options"].get("api", api):
        row["note"] = f"api {row['options']['api']!r} unavailable, ran {api!r}: {getattr(eng, 'api_reason', '')}"
    n_iter = cfg.warmup + cfg.iters
    t_ideal = port_bound_time(case.pattern, G, case.nbytes, pair_Bps) if pair_Bps else 0.0
    delays = _skews(cfg, idx, G, t_ideal, n_iter)[:, rank] if pair_Bps else np.zeros(n_iter)
    recv = recv_nbytes(case.pattern, rank, G, case.nbytes)
    times, max_issue = [], 0.0
    base = 0.0
    for it in range(n_iter):
        if check and it == n_iter - 1 and recv:
            dst.tensor(0, recv).fill_(_POISON)
        clock.sync()
        if isinstance(clock, _CudaClock):  # the sleep must outlast the host's issue of the plan
            base = max(1e-3, 2.0 * max(max_issue, 20e-6 * len(plan) if it == 0 else 0.0))
        group.barrier()
        start, after = clock.begin(base + float(delays[it]))
        rec = None
        if tel is not None and getattr(eng, "timed", False):  # --trace: this job's telemetry
            label = f"{case.pattern} {case.schedule.name} {case.nbytes}B #{it}{' warm-up' if it < cfg.warmup else ''}"
            rec = tel.open(idx * n_iter + it, idx, 0, label=label)
            timing = {"timing": tel.submitting(rec, plan, True)}
        h0 = time.perf_counter()
        done = eng.submit(plan, src_base=0, dst=dst, dst_base=0, after=after, **(timing if rec else {}))
        max_issue = max(max_issue, time.perf_counter() - h0)
        if rec is not None:
            tel.submitted(rec, done)
            tel.finished(rec)
        end = clock.end(done)
        t = clock.elapsed(start, end)
        if it >= cfg.warmup:
            times.append(t)
    clock.sync()
    wrong = 0
    if check:
        for j, s in enumerate(sources(case.pattern, rank, G)):
            wrong += count_wrong(dst.tensor(j * case.nbytes, case.nbytes), s, cfg.seed)
    everyone = group.comm.all_gather_object((times, wrong))
    worst = [max(ts[i] for ts, _ in everyone) for i in range(cfg.iters)]
    if pair_Bps:
        row.update(row_metrics(case, G, worst, pair_Bps))
    row["wrong"] = int(sum(w for _, w in everyone)) if check else None
    row["iters"] = cfg.iters
    row["_times"] = worst
    row["issue_us"] = 1e6 * max_issue  # longest host submit of the plan (the GPU start delay covers it)
    return row

"""Timing for benchmarks: sustained blocks of back-to-back calls, per-round ratios, summaries.

What the perf scripts share (``perf/bench_grouped_gemm.py``, ``perf/bench_hf_experts.py``,
``perf/probe_split_gemm.py``): :class:`Timer` (the method, and why, in its docstring),
:func:`summarize_times` (one row per variant), :func:`pct` and :func:`rel_err` (the checks next
to the timings). Benchmarks measure; nothing here asserts a time.
"""

from __future__ import annotations

import math
import random
import statistics
import time

import torch

from ..errors import bad_arg

__all__ = ["Timer", "pct", "summarize_times", "rel_err"]


class Timer:
    """Sustained blocks of back-to-back calls, interleaved by variant, timed with CUDA events.

    Why blocks: an H200 running bf16 GEMMs sits at its power cap (~690 of 700 W, SM clock
    1.3-1.6 GHz of 1.98, moving with the power controller). Single calls of a few ms timed one
    by one (with sleeps and L2 flushes between them, the previous method) saw identical calls
    differ by 5-10 %. Here every variant runs ``n`` calls back to back (``n`` chosen so a block
    lasts about ``block_ms``) with no sync, sleep or flush in between: the GPU stays busy and at
    its steady state, as in inference, and a block averages over the controller's swings. Each
    timed block is preceded by ``lead`` x ``n`` untimed calls of the same variant: without them,
    a block after a light one (fp8 with quantization, copies) started with power headroom and
    ran ~3 % fast (seen as raw 3 % faster than the identical raw_again right after it). Blocks
    of all variants alternate within a round (a fresh random order each round); the ratio to the
    baseline is taken within each round, so slow drift cancels. Weights of several GB dwarf the
    50 MB L2, so back-to-back calls get no cache advantage. On CPU: wall clock per block.

    Parameters
    ----------
    device : torch.device
        Where the variants run: CUDA events on CUDA, the host clock elsewhere.
    block_ms : float
        Target length of one timed block (its calls per block are sized from one call).
    warmup_ms : float
        At least this much work in untimed rounds first (CUDA).
    lead : float
        Untimed calls before each timed block, as a fraction of the block's calls (CUDA).
    order : {"random", "rotate"}
        Order of the variants within a round: a fresh random one (seeded by ``order_seed``), or
        the list rotated by one each round.

    Notes
    -----
    Blocking: :meth:`rounds` synchronises the device (host waits) to size the blocks and at the
    end to read the events; the variants run on the current stream.
    """

    def __init__(self, device: torch.device, block_ms: float = 150.0, warmup_ms: float = 600.0,
                 lead: float = 0.5, order: str = "random", order_seed: int = 0):
        if order not in ("random", "rotate"):
            raise bad_arg("order", repr(order), "'random' or 'rotate'")
        self.order, self.order_seed = order, order_seed
        self.cuda = device.type == "cuda"
        self.block_ms = block_ms
        self.warmup_ms = warmup_ms
        self.lead = lead

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def _once_ms(self, fn) -> float:
        """One call's time (after one untimed call): sizes the blocks."""
        fn()
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return (time.perf_counter() - t0) * 1e3

    def rounds(self, fns: dict, reps: int, warmup: int = 1) -> dict[str, list[float]]:
        """Milliseconds per call of every variant, one value per round: ``{variant: [...]}``.

        ``reps`` rounds; in each, every variant runs one block. ``warmup`` untimed rounds first,
        at least ``warmup_ms`` of GPU work in all (to reach the steady clock). Attribute
        :attr:`calls` then holds the calls per block of each variant.
        """
        names = list(fns)
        self.calls = {k: max(1, round(self.block_ms / max(self._once_ms(fns[k]), 1e-3))) for k in names}
        per_round = len(names) * self.block_ms * (1 + self.lead)
        warm_rounds = max(warmup, math.ceil(self.warmup_ms / per_round)) if self.cuda else warmup
        times = {k: [] for k in names}
        marks = []
        rng = random.Random(self.order_seed)
        for r in range(warm_rounds + reps):
            # A new random order each round: the GPU's power state carries over from one block to
            # the next, so each variant must follow different variants in different rounds (rotating
            # one fixed order keeps every variant behind the same neighbour: a bias that never averages out).
            order = rng.sample(names, len(names)) if self.order == "random" else \
                names[r % len(names):] + names[:r % len(names)]
            for k in order:
                n, fn = self.calls[k], fns[k]
                for _ in range(math.ceil(self.lead * n) if self.cuda else 0):
                    fn()
                if self.cuda:
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    e0.record()
                    for _ in range(n):
                        fn()
                    e1.record()
                    if r >= warm_rounds:
                        marks.append((k, n, e0, e1))
                else:
                    t0 = time.perf_counter()
                    for _ in range(n):
                        fn()
                    if r >= warm_rounds:
                        times[k].append((time.perf_counter() - t0) * 1e3 / n)
        self.sync()
        for k, n, e0, e1 in marks:
            times[k].append(e0.elapsed_time(e1) / n)
        return times


def pct(v: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``v``, linearly interpolated; NaN for an empty list."""
    s = sorted(v)
    if not s:
        return math.nan
    i = (len(s) - 1) * q
    lo, hi = int(math.floor(i)), int(math.ceil(i))
    return s[lo] + (s[hi] - s[lo]) * (i - lo)


def summarize_times(times: dict[str, list[float]], base: str, flops: float, common: dict, section: str,
                    calls: dict | None = None) -> list[dict]:
    """One row per variant: median ms, TFLOP/s, and the per-round ratio t_base / t_variant.

    ``times``: :meth:`Timer.rounds`'s result; ``base``: the variant the ratios are taken against
    (in each round); ``flops``: work per call; ``common`` and ``section``: keys copied into every
    row; ``calls``: :attr:`Timer.calls`. Rows carry ``ms``, ``ms_p10``, ``ms_p90``, ``tflops``,
    ``ratio`` (median of the per-round ratios; > 1: faster than ``base``), ``ratio_p10``,
    ``ratio_p90``, ``rounds``, ``calls_per_block`` and ``ms_rounds``.
    """
    calls = calls or {}
    rows = []
    for k, v in times.items():
        ratios = [b / t for b, t in zip(times[base], v) if t > 0]
        ms = statistics.median(v)
        rows.append(dict(section=section, **common, variant=k, ms=ms, ms_p10=pct(v, 0.1), ms_p90=pct(v, 0.9),
                         tflops=flops / ms / 1e9 if ms > 0 else math.nan, base=base,
                         ratio=statistics.median(ratios), ratio_p10=pct(ratios, 0.1), ratio_p90=pct(ratios, 0.9),
                         rounds=len(v), calls_per_block=calls.get(k), ms_rounds=[round(t, 5) for t in v]))
    return rows


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float32 on their device (absolute when ``ref`` is 0); inf for
    a shape mismatch or a non-finite ``out``. One host sync (the norms)."""
    if tuple(out.shape) != tuple(ref.shape):
        return math.inf
    o, r = out.float(), ref.float()
    if not bool(torch.isfinite(o).all()):
        return math.inf
    den = r.norm().item()
    return (o - r).norm().item() / den if den else (o - r).norm().item()

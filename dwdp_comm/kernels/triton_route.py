"""A fused route-permute: one or two Triton launches instead of about 15 torch ops.

An experts forward is bound by the host at small and medium token counts: sorting the
``S = T * top_k`` token copies by expert with torch ops (:func:`dwdp_comm.moe.tokens.sort_by_expert`:
masks, a cast, a stable sort, a binary search for the offsets, a scatter for the inverse, then the
row gather and the routing-weight gather) dispatches about 15 ops, each a kernel launch of a few
microseconds of host time. :func:`route` does all of it on the GPU and returns:

- the end offsets per expert (``torch._grouped_mm``'s ``offs``),
- every copy's sorted row, as the element offset ``row * out_stride`` the combine reads
  (:func:`dwdp_comm.kernels.triton_moe.combine`), ``-1`` for sentinel ids,
- the token rows in sorted order (the grouped GEMM's input) and the routing weight of every
  sorted row.

The order is the stable one of :func:`~dwdp_comm.moe.tokens.sort_by_expert` (the reference the
tests compare with): copies of one expert keep their flattened ``(token, slot)`` order. The copies
are cut into chunks of ``CHUNK``; placing chunk ``p`` needs, per expert, its copies in chunks
before ``p`` and in all; then a copy's row is its expert's start, plus the copies of its expert in
earlier chunks, plus its rank inside its chunk (a ``CHUNK x CHUNK`` comparison). Two forms:

- **one pass** (one launch, small batches): program ``(p, q)`` counts every chunk's experts itself
  (a ``tl.histogram`` a chunk), so its work grows with ``S``: used up to :data:`ONE_PASS_MAX_ROWS`
  (and :data:`MAX_WORK`).
- **two passes** (larger batches): :func:`count` writes each block's expert counts (a block:
  :data:`PER_BLOCK` chunks), one ``torch.cumsum`` over the blocks gives the counts before each block
  and the totals, and a second kernel places every chunk (recounting the chunks of its block before
  its own): three launches whatever ``S``, about ``PER_BLOCK / 2`` histograms a chunk spread over the
  GPU. It replaces the torch ops past the one-pass bound, up to :data:`MAX_ROWS` copies (int32 offsets).

Either way program column ``q`` copies its share of the hidden columns of chunk ``p``'s rows, so
the gather is spread over the whole GPU. Rows of sentinel copies (ids outside
``[0, num_experts)``) are not written: they sort past ``offsets[-1]``, where no grouped GEMM,
activation or combine reads.

Triton is imported on first use (the JIT functions live in
:mod:`dwdp_comm.kernels.triton_route_kernels`); :func:`unavailable_reason` also honours
:data:`dwdp_comm.kernels.triton_moe.ENABLED`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from ..errors import bad_arg
from . import triton_moe

__all__ = ["Route", "route", "count", "fits", "one_pass", "unavailable_reason", "MAX_WORK", "ONE_PASS_MAX_ROWS",
           "MAX_ROWS", "MAX_EXPERTS", "CHUNK", "PER_BLOCK", "padded_experts"]

#: One-pass bound on ``S * E_pad`` (``E_pad``: the expert count rounded up to a power of two, at
#: least 32), with :data:`ONE_PASS_MAX_ROWS`. Each program of the one-pass kernel counts all ``S``
#: copies itself, so its GPU time grows with ``S``; its one launch costs the host about half the
#: two-pass form's three (count, cumsum, place). Measured (H100, perf/results/bench_route_h100_88575a3.json,
#: eager / GPU time per route): at 2048 copies one pass 43-77 us / 21-50 us against two passes
#: 84-151 us / 12-24 us (Qwen3-MoE, DeepSeek-V3, Mixtral, OLMoE): one pass, where a forward that small is
#: bound by the host; at 4096 copies (GPT-OSS, 1K tokens) 66 / 51 us against 109 / 19 us, and from
#: 8192 copies two passes win both (Qwen3-MoE at 1K tokens: 77 / 29 us against 99 / 100 us; the torch
#: ops 221 / 98 us). Read at call time (``perf/bench_route.py`` re-measures).
MAX_WORK = 2**19
#: Most copies the one-pass form takes (see :data:`MAX_WORK`).
ONE_PASS_MAX_ROWS = 2048
#: Most copies :func:`route` takes (either form): sorted rows are int32 offsets. Past the one-pass
#: bound the two-pass form beat the torch ops at every measured size, eager and GPU time (same file:
#: 1.23-1.52x GPU time at 64K tokens of the five families, 1.4-3.4x from 1K to 16K).
MAX_ROWS = 2**23
#: Most experts :func:`route` supports (``E_pad``-bin histograms and prefix sums per program).
MAX_EXPERTS = 512
CHUNK = 32  # copies per chunk (a power of two): one histogram a step, a CHUNK x CHUNK rank comparison
#: Two-pass form: chunks per counted block. The count buffer holds ``S / (CHUNK * PER_BLOCK)`` rows of
#: ``E_pad`` int32 (2 MiB for 64K tokens of top-8 over 256 experts, beside the 7 GiB of their rows at
#: DeepSeek-V3's hidden size); a placing program recounts fewer than PER_BLOCK chunks of its block.
PER_BLOCK = 8
BLOCK_H = 128  # hidden columns per gather step


class Route(NamedTuple):
    """What :func:`route` returns (every tensor on ``x``'s device).

    Attributes
    ----------
    rows : torch.Tensor
        ``[S, H]`` token rows in sorted order, ``x``'s dtype; rows ``>= offsets[-1]`` (sentinel
        copies) are not written.
    offsets : torch.Tensor
        ``[E]`` int32 end offsets: expert ``e`` owns sorted rows ``[offsets[e-1], offsets[e])``.
    src : torch.Tensor
        ``[T, k]`` int64: ``row * out_stride`` of every (token, slot)'s sorted row, ``-1`` for
        sentinels (the combine's source offsets).
    row_weights : torch.Tensor
        ``[S]`` routing weight of every sorted row (``top_k_weights``' dtype); sentinel rows not written.
    """

    rows: torch.Tensor
    offsets: torch.Tensor
    src: torch.Tensor
    row_weights: torch.Tensor


@functools.lru_cache(maxsize=None)
def _kernels():
    """``(triton, kernels module)``, or the reason Triton cannot be imported."""
    try:
        import triton
        from . import triton_route_kernels
    except Exception as exc:  # ImportError, or a broken install
        return f"triton is not importable: {type(exc).__name__}: {exc}"
    return triton, triton_route_kernels


def padded_experts(num_experts: int) -> int:
    """The expert bins of the kernels: ``num_experts`` rounded up to a power of two, at least 32."""
    return max(32, 1 << max(0, int(num_experts) - 1).bit_length())


def fits(num_rows: int, num_experts: int) -> bool:
    """True when :func:`route` takes ``num_rows`` copies over ``num_experts`` (at most
    :data:`MAX_ROWS` copies and :data:`MAX_EXPERTS` experts), in one form or the other."""
    return 0 < num_experts <= MAX_EXPERTS and num_rows <= MAX_ROWS


def one_pass(num_rows: int, num_experts: int) -> bool:
    """True when the one-launch form is the one to run (within :data:`ONE_PASS_MAX_ROWS` and
    :data:`MAX_WORK`), False for the two-pass form."""
    return num_rows <= ONE_PASS_MAX_ROWS and num_rows * padded_experts(num_experts) <= MAX_WORK


def unavailable_reason(x: torch.Tensor, num_rows: int, num_experts: int, max_rows: int | None = None) -> str | None:
    """None when :func:`route` runs for ``x`` with ``num_rows`` copies over ``num_experts``, else why not.

    Sizes: :func:`fits`; ``max_rows`` (tests, benchmarks) replaces that rule by ``num_rows <= max_rows``.
    """
    why = triton_moe.unavailable_reason(x)
    if why is not None:
        return why
    if not 0 < num_experts <= MAX_EXPERTS:
        return f"{num_experts} experts (the fused route takes 1 .. {MAX_EXPERTS})"
    if not (fits(num_rows, num_experts) if max_rows is None else num_rows <= max_rows):
        return f"{num_rows} token copies (the fused route takes up to MAX_ROWS = {MAX_ROWS})"
    if x.stride(-1) != 1:
        return f"x strides {x.stride()} (the fused route needs the hidden dim contiguous)"
    got = _kernels()
    return got if isinstance(got, str) else None


@functools.lru_cache(maxsize=None)
def _num_sms(index: int | None) -> int:
    if index is None or not torch.cuda.is_available():
        return 8  # TRITON_INTERPRET on CPU: any small grid
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def count(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[ceil(S / (CHUNK * PER_BLOCK)), E_pad]`` int32: copies of each expert in each block of
    ``CHUNK * PER_BLOCK`` copies (the two-pass route's first pass; ``E_pad`` from :func:`padded_experts`).
    Bins ``>= num_experts`` are not meaningful (ids past it land there, negative ids nowhere).

    ``ids``: ``[T, k]`` contiguous int64 / int32 expert ids. Enqueued on the current stream."""
    triton, k = _kernels()
    s = ids.numel()
    e_pad = padded_experts(num_experts)
    chunks = triton.cdiv(s, CHUNK)
    out = torch.empty(triton.cdiv(chunks, PER_BLOCK), e_pad, dtype=torch.int32, device=ids.device)
    if s:
        k.count_kernel[(out.shape[0],)](ids, out, s, chunks, CHUNK=CHUNK, E_PAD=e_pad, PER_BLOCK=PER_BLOCK,
                                        num_warps=4)
    return out


def route(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int, *,
          out_stride: int | None = None, passes: int | None = None) -> Route:
    """Sort the token copies by expert and gather their rows and weights, in one or two passes.

    Parameters
    ----------
    x : torch.Tensor
        ``[T, H]`` token rows (bf16, fp16 or float32; hidden dim contiguous, any row stride).
    top_k_index : torch.Tensor
        ``[T, k]`` int64 or int32 expert ids; ids outside ``[0, num_experts)`` are sentinels.
    top_k_weights : torch.Tensor
        ``[T, k]`` routing weights (any float dtype).
    num_experts : int
    out_stride : int, optional
        Row stride (elements) of the tensor the combine will read; default ``H``.
    passes : {None, 1, 2}, optional
        The form: None for :func:`one_pass`'s rule; 1 or 2 to force one (tests, benchmarks; the
        one-pass form takes at most :data:`ONE_PASS_MAX_ROWS` copies).

    Returns
    -------
    Route
        Enqueued on the current stream of ``x``'s device; no host synchronisation. One launch, or
        three (count, ``torch.cumsum``, place) and :func:`count`'s int32 buffer.

    Notes
    -----
    The caller checks :func:`unavailable_reason` first (shapes are not re-checked here: this is
    the hot path of small batches). Same results as :func:`dwdp_comm.moe.tokens.sort_by_expert`
    followed by the gathers, in either form (tested against it on fresh random data).
    """
    if passes not in (None, 1, 2):
        raise bad_arg("passes", passes, "None, 1 or 2")
    triton, kern = _kernels()
    t, hidden = x.shape
    k = int(top_k_index.shape[1])
    s = t * k
    ids = top_k_index if top_k_index.is_contiguous() else top_k_index.contiguous()
    w = top_k_weights if top_k_weights.is_contiguous() else top_k_weights.contiguous()
    dev = x.device
    rows = torch.empty(s, hidden, dtype=x.dtype, device=dev)
    offsets = torch.empty(num_experts, dtype=torch.int32, device=dev)
    src = torch.empty(t, k, dtype=torch.int64, device=dev)
    row_w = torch.empty(s, dtype=w.dtype, device=dev)
    if s == 0:
        return Route(rows, offsets.zero_(), src, row_w)
    chunks = triton.cdiv(s, CHUNK)
    # Enough programs to spread the row copies over the GPU: split the hidden columns.
    split = max(1, min(triton.cdiv(hidden, BLOCK_H), triton.cdiv(2 * _num_sms(dev.index), chunks)))
    cols_per = triton.cdiv(triton.cdiv(hidden, split), BLOCK_H) * BLOCK_H
    split = triton.cdiv(hidden, cols_per)
    e_pad = padded_experts(num_experts)
    common = (s, num_experts, k, hidden, x.stride(0), hidden if out_stride is None else out_stride, cols_per, chunks)
    if (one_pass(s, num_experts) if passes is None else passes == 1):
        kern.route_kernel[(chunks, split)](ids, w, x, rows, offsets, src, row_w, *common,
                                           CHUNK=CHUNK, E_PAD=e_pad, BLOCK_H=BLOCK_H, num_warps=4)
    else:
        counts = count(ids, num_experts)
        incl = torch.cumsum(counts, 0, dtype=torch.int32)
        kern.place_kernel[(chunks, split)](ids, w, x, rows, offsets, src, row_w, counts, incl, *common,
                                           int(counts.shape[0]), CHUNK=CHUNK, E_PAD=e_pad, BLOCK_H=BLOCK_H,
                                           PER_BLOCK=PER_BLOCK, num_warps=4)
    return Route(rows, offsets, src, row_w)

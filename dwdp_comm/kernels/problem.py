"""Validated inputs of a grouped GEMM: weight pieces and the :class:`Problem` every backend runs.

Every backend receives a :class:`Problem` built by :func:`make_problem`, so argument checking and
its messages live here, once (token groups: :mod:`dwdp_comm.kernels.token_groups`).

Conventions
-----------
- Weights are logically ``[num_experts, K, N]`` (``out[rows of e] = x[rows of e] @ w[e]``). Any
  strides are accepted by the reference; the fast paths want the last or the second-to-last dim
  contiguous (``[E, K, N]`` row-major, or ``[E, N, K]`` storage passed as ``w.transpose(-1, -2)``).
- Split weights are a list of pieces ``(first_expert, tensor[count, K, N])`` covering experts
  ``0 .. E-1`` in order; they are read in place (views only, never merged).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import bad_arg, bad_type
from .token_groups import TokenGroups

__all__ = ["Problem", "make_problem", "normalize_weights", "WEIGHT_DTYPES", "FP8_DTYPE"]

FP8_DTYPE = torch.float8_e4m3fn
WEIGHT_DTYPES = (torch.bfloat16, torch.float32, FP8_DTYPE)
_ACT_DTYPES = (torch.bfloat16, torch.float32)


def normalize_weights(weights: Any, name: str = "weights") -> list[tuple[int, torch.Tensor]]:
    """Turn any accepted weights form into pieces ``[(first_expert, tensor[count, K, N]), ...]``.

    Accepted: one ``[E, K, N]`` tensor; a list of ``(first_expert, tensor[count, K, N])``
    segments (as :meth:`dwdp_comm.PrefetchHandle.weight_segments` returns); a list of
    per-expert ``[K, N]`` and/or per-owner ``[n_i, K, N]`` tensors in expert order.
    Zero-count pieces are dropped. No data is copied.
    """
    if isinstance(weights, torch.Tensor):
        if weights.dim() != 3:
            raise bad_arg(name, f"a tensor of shape {tuple(weights.shape)}", "[num_experts, K, N] (3-D)")
        if weights.shape[0] == 0:
            raise bad_arg(name, "0 experts", "at least one expert")
        return [(0, weights)]
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise bad_type(name, weights, "a [E, K, N] tensor or a list of weight tensors / (first_expert, tensor) segments")
    if len(weights) == 0:
        raise bad_arg(name, "an empty list", "at least one weight tensor")
    segmented = [isinstance(w, tuple) for w in weights]
    if any(segmented) and not all(segmented):
        raise bad_arg(name, "a mix of (first_expert, tensor) tuples and bare tensors", "one form for the whole list")
    pieces: list[tuple[int, torch.Tensor]] = []
    nxt = 0
    for i, item in enumerate(weights):
        where = f"{name}[{i}]"
        if segmented[0]:
            if len(item) != 2:
                raise bad_arg(where, f"a tuple of length {len(item)}", "(first_expert, tensor[count, K, N])")
            first, t = item
            if isinstance(first, bool) or not isinstance(first, (int, np.integer)):
                raise bad_type(f"{where}[0]", first, "an int (first expert of the segment)")
            if not isinstance(t, torch.Tensor):
                raise bad_type(f"{where}[1]", t, "a torch.Tensor")
            if t.dim() != 3:
                raise bad_arg(f"{where}[1]", f"shape {tuple(t.shape)}", "[count, K, N] (3-D)")
            if int(first) != nxt:
                raise bad_arg(f"{where}[0]", int(first), f"{nxt} (segments must cover experts 0..E-1 in order, "
                              "without gaps or overlaps)")
        else:
            t = item
            if not isinstance(t, torch.Tensor):
                raise bad_type(where, t, "a torch.Tensor ([K, N] per expert or [count, K, N] per owner)")
            if t.dim() == 2:
                t = t.unsqueeze(0)
            elif t.dim() != 3:
                raise bad_arg(where, f"shape {tuple(t.shape)}", "[K, N] (one expert) or [count, K, N] (several)")
        if t.shape[0]:
            pieces.append((nxt, t))
        nxt += int(t.shape[0])
    if not pieces:
        raise bad_arg(name, "pieces holding 0 experts", "at least one expert")
    return pieces


@dataclass
class Problem:
    """A validated grouped GEMM: ``out[rows of e] = x[rows of e] @ w[e]`` for every expert ``e``.

    Attributes
    ----------
    x : torch.Tensor
        ``[T, K]`` bf16 or float32.
    groups : TokenGroups
    pieces : list of (int, torch.Tensor)
        Weight pieces ``(first_expert, [count, K, N])``, same dtype and device as each other.
    scales : list of torch.Tensor or None
        fp8 only: float32 ``[count, N]`` per piece (per output channel of each expert).
    out : torch.Tensor or None
        Caller's ``[T, N]`` output buffer.
    out_dtype : torch.dtype
        Dtype of the result (x's dtype; bf16 for fp8 weights).
    x_scales : torch.Tensor or None
        Pre-quantized fp8 x only: float32 ``[T]`` per-row scales.
    """

    x: torch.Tensor
    groups: TokenGroups
    pieces: list
    scales: list | None
    out: torch.Tensor | None
    out_dtype: torch.dtype
    num_experts: int
    K: int
    N: int
    x_scales: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        """Total rows (as :attr:`sizes`)."""
        return int(self.x.shape[0])

    @property
    def wdtype(self) -> torch.dtype:
        return self.pieces[0][1].dtype

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def is_fp8(self) -> bool:
        return self.wdtype == FP8_DTYPE

    def experts(self):
        """Yield ``(expert, piece_index, row_in_piece)`` for every expert in order."""
        for pi, (first, t) in enumerate(self.pieces):
            for i in range(t.shape[0]):
                yield first + i, pi, i

    def flops(self) -> int:
        return 2 * self.num_tokens * self.K * self.N


def make_problem(x: Any, m_sizes_or_offsets: Any, weights: Any, *, offsets: bool = False,
                 weight_scales: Any = None, x_scales: Any = None, out: Any = None,
                 ignore_tail: bool = False) -> Problem:
    """Validate every argument of :func:`dwdp_comm.kernels.grouped_gemm`; see it for their meaning."""
    if not isinstance(x, torch.Tensor):
        raise bad_type("x", x, "a torch.Tensor [num_tokens, K]")
    if x.dim() != 2:
        raise bad_arg("x", f"shape {tuple(x.shape)}", "[num_tokens, K] (2-D, tokens grouped by expert)")
    pieces = normalize_weights(weights)
    dev, dt = x.device, x.dtype
    K, N = int(pieces[0][1].shape[1]), int(pieces[0][1].shape[2])
    for first, t in pieces:
        where = f"weights (experts {first}..{first + t.shape[0] - 1})"
        if t.device != dev:
            raise bad_arg(where, f"a tensor on {t.device}", f"weights on x's device {dev}",
                          "move the weights or x; grouped_gemm never copies weights")
        if t.dtype not in WEIGHT_DTYPES:
            raise bad_arg(where, f"dtype {t.dtype}", f"one of {[str(d) for d in WEIGHT_DTYPES]}")
        if t.dtype != pieces[0][1].dtype:
            raise bad_arg(where, f"dtype {t.dtype}", f"the dtype of the other pieces ({pieces[0][1].dtype})")
        if (int(t.shape[1]), int(t.shape[2])) != (K, N):
            raise bad_arg(where, f"[K, N] = {list(t.shape[1:])}", f"[{K}, {N}] like the first piece")
    E = pieces[-1][0] + int(pieces[-1][1].shape[0])
    wdt = pieces[0][1].dtype
    if dt == FP8_DTYPE:
        if wdt != FP8_DTYPE:
            raise bad_arg("x", f"dtype {dt}", f"the weights' dtype {wdt} (fp8 x needs fp8 weights)")
        if not isinstance(x_scales, torch.Tensor) or x_scales.dtype != torch.float32 or \
                tuple(x_scales.shape) != (int(x.shape[0]),) or x_scales.device != dev or not x_scales.is_contiguous():
            got = (f"{tuple(x_scales.shape)} {x_scales.dtype} on {x_scales.device}"
                   if isinstance(x_scales, torch.Tensor) else x_scales)
            raise bad_arg("x_scales", got, f"a contiguous float32 [{int(x.shape[0])}] tensor on {dev} "
                          "(per-row scales of the fp8 x)")
    elif x_scales is not None:
        raise bad_arg("x_scales", "scales", f"None for {dt} x (x_scales go with a pre-quantized fp8 x)")
    elif dt not in _ACT_DTYPES:
        raise bad_arg("x", f"dtype {dt}", "torch.bfloat16 or torch.float32 (or float8_e4m3fn with x_scales)")
    if wdt == FP8_DTYPE:
        if dt not in (torch.bfloat16, FP8_DTYPE):
            raise bad_arg("x", f"dtype {dt}", "torch.bfloat16 with fp8 weights (x is quantized per row inside), "
                          "or float8_e4m3fn with x_scales")
    elif wdt != dt:
        raise bad_arg("x", f"dtype {dt}", f"the weights' dtype {wdt}", "cast x or the weights; no mixed dtypes")
    if int(x.shape[1]) != K:
        raise bad_arg("x", f"shape {tuple(x.shape)}", f"[num_tokens, K={K}] (K from the weights)")
    groups = m_sizes_or_offsets if isinstance(m_sizes_or_offsets, TokenGroups) else \
        TokenGroups(m_sizes_or_offsets, offsets=offsets)
    if not isinstance(ignore_tail, bool):
        raise bad_type("ignore_tail", ignore_tail, "a bool")
    groups.check(E, int(x.shape[0]), ignore_tail=ignore_tail)
    scales = _normalize_scales(weight_scales, pieces, N) if wdt == FP8_DTYPE else None
    if wdt != FP8_DTYPE and weight_scales is not None:
        raise bad_arg("weight_scales", "scales", f"None for {wdt} weights (scales are for fp8 weights only)")
    odt = torch.bfloat16 if wdt == FP8_DTYPE else dt
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise bad_type("out", out, "a torch.Tensor or None")
        want = (int(x.shape[0]), N)
        if tuple(out.shape) != want or out.dtype != odt or out.device != dev:
            raise bad_arg("out", f"{tuple(out.shape)} {out.dtype} on {out.device}", f"{want} {odt} on {dev}")
        if not out.is_contiguous():
            raise bad_arg("out", f"strides {out.stride()}", "a contiguous tensor")
    return Problem(x=x, groups=groups, pieces=pieces, scales=scales, out=out, out_dtype=odt,
                   num_experts=E, K=K, N=N, x_scales=x_scales)


def _scale_pieces(scales: Any, name: str) -> list[tuple[int, torch.Tensor]]:
    """Scales in any accepted form as ``[(first_expert, tensor[count, N]), ...]``."""
    if isinstance(scales, torch.Tensor):
        if scales.dim() != 2:
            raise bad_arg(name, f"shape {tuple(scales.shape)}", "[num_experts, N]")
        return [(0, scales)]
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence) or not len(scales):
        raise bad_type(name, scales, "a [E, N] float32 tensor or a non-empty list shaped like the weights")
    out, nxt = [], 0
    for i, item in enumerate(scales):
        first, s = item if isinstance(item, tuple) and len(item) == 2 else (nxt, item)
        if not isinstance(s, torch.Tensor) or s.dim() not in (1, 2):
            raise bad_arg(f"{name}[{i}]", type(s).__name__ if not isinstance(s, torch.Tensor) else
                          f"shape {tuple(s.shape)}", "[N] (one expert) or [count, N]")
        if first != nxt:
            raise bad_arg(f"{name}[{i}][0]", first, f"{nxt} (pieces must cover experts in order)")
        s = s.unsqueeze(0) if s.dim() == 1 else s
        out.append((nxt, s))
        nxt += int(s.shape[0])
    return out


def _normalize_scales(scales: Any, pieces: list, N: int) -> list[torch.Tensor]:
    """One float32 ``[count, N]`` scale tensor per weight piece (views when the splits match)."""
    name = "weight_scales"
    if scales is None:
        raise bad_arg(name, None, "float32 per-row scales ([E, N], or pieces like the weights) for fp8 weights")
    sp = _scale_pieces(scales, name)
    E = pieces[-1][0] + int(pieces[-1][1].shape[0])
    total = sp[-1][0] + int(sp[-1][1].shape[0])
    if total != E:
        raise bad_arg(name, f"scales for {total} experts", f"scales for the weights' {E} experts")
    if [(f, int(s.shape[0])) for f, s in sp] == [(f, int(t.shape[0])) for f, t in pieces]:
        out = [s for _, s in sp]
    else:  # split differently from the weights: stack the (small) scales once, then slice
        flat = sp[0][1] if len(sp) == 1 else torch.cat([s for _, s in sp])
        out = [flat[first:first + t.shape[0]] for first, t in pieces]
    for (first, t), s in zip(pieces, out):
        where = f"{name} (experts {first}..{first + t.shape[0] - 1})"
        if s.dtype != torch.float32:
            raise bad_arg(where, f"dtype {s.dtype}", "torch.float32")
        if s.device != t.device:
            raise bad_arg(where, f"a tensor on {s.device}", f"the weights' device {t.device}")
        if tuple(s.shape) != (t.shape[0], N):
            raise bad_arg(where, f"shape {tuple(s.shape)}", f"[{t.shape[0]}, {N}] (one scale per output channel)")
    return out

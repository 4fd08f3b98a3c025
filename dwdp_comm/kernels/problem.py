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
  :func:`normalize_weights` is the one normaliser of such pieces (weights, scales, biases), also
  used by :func:`dwdp_comm.moe.experts_forward`.
- Quantized weights (:mod:`dwdp_comm.kernels.quant`) are ``[E, N, K]`` storage passed as
  ``w.transpose(-1, -2)`` (mxfp4: ``[E, N, K / 2]`` bytes, so the logical view is ``[E, K / 2, N]``),
  with one scale tensor per piece in the format's own storage.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..errors import bad_arg, bad_type
from ..checks import check_int
from . import quant
from .quant import DEFAULT_BLOCK_SIZE
from .token_groups import TokenGroups

__all__ = ["Problem", "make_problem", "normalize_weights", "normalize_scales", "align_pieces", "num_experts_of",
           "WEIGHT_DTYPES", "FP8_DTYPE"]

FP8_DTYPE = torch.float8_e4m3fn
WEIGHT_DTYPES = (torch.bfloat16, torch.float32, FP8_DTYPE)
_ACT_DTYPES = (torch.bfloat16, torch.float32)


def normalize_weights(weights: Any, name: str = "weights", *, ndim: int = 3,
                      shape: str = "[count, K, N]") -> list[tuple[int, torch.Tensor]]:
    """Turn any accepted form of per-expert tensors into pieces ``[(first_expert, tensor[count, ...]), ...]``.

    The one normaliser of weight pieces: grouped GEMM weights, their scales and biases, and
    :func:`dwdp_comm.moe.experts_forward`'s projections all go through it.

    Parameters
    ----------
    weights : torch.Tensor or list
        One ``[E, ...]`` tensor (``ndim`` dims); a list of ``(first_expert, tensor[count, ...])``
        segments (as :meth:`dwdp_comm.PrefetchHandle.weight_segments` returns); or a list of
        per-expert (``ndim - 1`` dims) and/or per-owner (``ndim`` dims) tensors in expert order.
        Segment tuples and bare tensors are not mixed in one list.
    name : str
        How errors name the argument (items as ``name[i]``).
    ndim : int
        Dims of a piece: 3 for ``[count, K, N]`` weights, 2 for ``[count, N]`` scales or biases.
    shape : str
        How errors describe one piece.

    Returns
    -------
    list of (int, torch.Tensor)
        Views (no data copied), zero-count pieces dropped, first experts consecutive from 0.

    Raises
    ------
    InvalidArgumentError, InvalidTypeError
        A bad form; the message names ``name`` or the item.
    """
    if isinstance(weights, torch.Tensor):
        if weights.dim() != ndim:
            raise bad_arg(name, f"a tensor of shape {tuple(weights.shape)}", f"{shape.replace('count', 'num_experts')} "
                          f"({ndim}-D)")
        if weights.shape[0] == 0:
            raise bad_arg(name, "0 experts", "at least one expert")
        return [(0, weights)]
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise bad_type(name, weights, f"a {shape.replace('count', 'E')} tensor or a list of tensors / "
                       "(first_expert, tensor) segments")
    if len(weights) == 0:
        raise bad_arg(name, "an empty list", "at least one tensor")
    segmented = [isinstance(w, tuple) for w in weights]
    if any(segmented) and not all(segmented):
        raise bad_arg(name, "a mix of (first_expert, tensor) tuples and bare tensors", "one form for the whole list")
    pieces: list[tuple[int, torch.Tensor]] = []
    nxt = 0
    for i, item in enumerate(weights):
        where = f"{name}[{i}]"
        if segmented[0]:
            if len(item) != 2:
                raise bad_arg(where, f"a tuple of length {len(item)}", f"(first_expert, tensor{shape})")
            first, t = item
            first = check_int(f"{where}[0]", first)
            if not isinstance(t, torch.Tensor):
                raise bad_type(f"{where}[1]", t, "a torch.Tensor")
            if int(first) != nxt:
                raise bad_arg(f"{where}[0]", int(first), f"{nxt} (segments must cover experts 0..E-1 in order, "
                              "without gaps or overlaps)")
            where = f"{where}[1]"
        else:
            t = item
            if not isinstance(t, torch.Tensor):
                raise bad_type(where, t, f"a torch.Tensor ({shape} per owner, or one expert without the count)")
        if t.dim() == ndim - 1:
            t = t.unsqueeze(0)
        elif t.dim() != ndim:
            raise bad_arg(where, f"shape {tuple(t.shape)}", f"{shape} ({ndim}-D) or one expert ({ndim - 1}-D)")
        if t.shape[0]:
            pieces.append((nxt, t))
        nxt += int(t.shape[0])
    if not pieces:
        raise bad_arg(name, "pieces holding 0 experts", "at least one expert")
    return pieces


def num_experts_of(pieces: list) -> int:
    """Experts covered by normalised ``pieces``."""
    return pieces[-1][0] + int(pieces[-1][1].shape[0])


def align_pieces(pieces: list, like: list, name: str) -> list[torch.Tensor]:
    """``pieces`` (normalised) re-split like the normalised pieces ``like``: one tensor per piece of
    ``like`` (views when the splits match; else the small tensors are concatenated once and sliced)."""
    total, want = num_experts_of(pieces), num_experts_of(like)
    if total != want:
        raise bad_arg(name, f"{total} experts", f"{want} experts, as the weights")
    if [(f, int(t.shape[0])) for f, t in pieces] == [(f, int(t.shape[0])) for f, t in like]:
        return [t for _, t in pieces]
    flat = pieces[0][1] if len(pieces) == 1 else torch.cat([t for _, t in pieces])
    return [flat[first:first + int(t.shape[0])] for first, t in like]


@dataclass
class Problem:
    """A validated grouped GEMM: ``out[rows of e] = x[rows of e] @ w[e]`` for every expert ``e``.

    Attributes
    ----------
    x : torch.Tensor
        ``[T, K]`` bf16 or float32 (fp8 with ``x_scales`` for pre-quantized ``fp8_channel``).
    groups : TokenGroups
    pieces : list of (int, torch.Tensor)
        Weight pieces ``(first_expert, [count, K, N])`` (logical; quantized formats are
        ``[count, N, K]`` storage seen transposed, mxfp4 ``[count, K / 2, N]`` bytes), same dtype
        and device as each other.
    scales : list of torch.Tensor or None
        Quantized formats: one scale tensor per piece, in the format's storage
        (:mod:`dwdp_comm.kernels.quant`): ``fp8_channel`` float32 ``[count, N]``, ``fp8_block``
        float32 ``[count, ceil(N/bn), ceil(K/bk)]``, ``mxfp4`` uint8 ``[count, N, K / 32]``.
    out : torch.Tensor or None
        Caller's ``[T, N]`` output buffer.
    out_dtype : torch.dtype
        Dtype of the result (x's dtype; bf16 for quantized weights).
    fmt : str
        The weight format (:data:`dwdp_comm.kernels.quant.WEIGHT_FORMATS`).
    block_size : (int, int)
        ``fp8_block`` only: the scale blocks ``(bn, bk)``.
    x_scales : torch.Tensor or None
        Pre-quantized fp8 x only: float32 ``[T]`` per-row scales.
    x_rows : torch.Tensor or None
        A gather fused into the GEMM: row ``r`` of the input is ``x[x_rows[r] // x_top_k]``
        (``x`` then holds the tokens, ``[num_tokens_in, K]``). Paths that cannot fuse it call
        :meth:`gathered` first.
    x_top_k : int
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
    fmt: str = "bf16"
    block_size: tuple = DEFAULT_BLOCK_SIZE
    x_rows: torch.Tensor | None = None
    x_top_k: int = 1

    @property
    def num_tokens(self) -> int:
        """Total rows of the GEMM (``len(x_rows)`` with a fused gather)."""
        return int(self.x.shape[0] if self.x_rows is None else self.x_rows.shape[0])

    def gathered(self) -> "Problem":
        """This problem with the fused gather done (one ``index_select``); itself without one."""
        if self.x_rows is None:
            return self
        x = self.x.index_select(0, torch.div(self.x_rows, self.x_top_k, rounding_mode="floor"))
        return dataclasses.replace(self, x=x, x_rows=None, x_top_k=1)

    @property
    def wdtype(self) -> torch.dtype:
        return self.pieces[0][1].dtype

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def is_fp8(self) -> bool:
        """Per-channel fp8 (``fp8_channel``): the ``torch._scaled_grouped_mm`` path."""
        return self.fmt == "fp8_channel"

    @property
    def is_quantized(self) -> bool:
        return self.fmt != "bf16"

    def experts(self):
        """Yield ``(expert, piece_index, row_in_piece)`` for every expert in order."""
        for pi, (first, t) in enumerate(self.pieces):
            for i in range(t.shape[0]):
                yield first + i, pi, i

    def flops(self) -> int:
        return 2 * self.num_tokens * self.K * self.N


def make_problem(x: Any, m_sizes_or_offsets: Any, weights: Any, *, offsets: bool = False,
                 weight_scales: Any = None, x_scales: Any = None, out: Any = None,
                 ignore_tail: bool = False, weight_format: str | None = None,
                 block_size: Any = DEFAULT_BLOCK_SIZE, x_rows: Any = None, x_top_k: int = 1) -> Problem:
    """Validate every argument of :func:`dwdp_comm.kernels.grouped_gemm`; see it for their meaning.

    ``x_rows`` (optional, with ``x_top_k``): the GEMM's rows are ``x[x_rows[r] // x_top_k]``, an
    int64 ``[rows]`` device tensor (a token order, :class:`dwdp_comm.moe.TokenOrder`'s ``order``).
    """
    if not isinstance(x, torch.Tensor):
        raise bad_type("x", x, "a torch.Tensor [num_tokens, K]")
    if x.dim() != 2:
        raise bad_arg("x", f"shape {tuple(x.shape)}", "[num_tokens, K] (2-D, tokens grouped by expert)")
    pieces = normalize_weights(weights)
    fmt = _weight_format(pieces, weight_scales, weight_format)
    bs = quant.check_block_size(block_size)
    dev, dt = x.device, x.dtype
    K, N = int(pieces[0][1].shape[1]) * (2 if fmt == "mxfp4" else 1), int(pieces[0][1].shape[2])
    for first, t in pieces:
        where = f"weights (experts {first}..{first + t.shape[0] - 1})"
        if t.device != dev:
            raise bad_arg(where, f"a tensor on {t.device}", f"weights on x's device {dev}",
                          "move the weights or x; grouped_gemm never copies weights")
        if t.dtype not in WEIGHT_DTYPES and fmt != "mxfp4":
            raise bad_arg(where, f"dtype {t.dtype}", f"one of {[str(d) for d in WEIGHT_DTYPES]} (or uint8 mxfp4)")
        if t.dtype != pieces[0][1].dtype:
            raise bad_arg(where, f"dtype {t.dtype}", f"the dtype of the other pieces ({pieces[0][1].dtype})")
        if (int(t.shape[1]), int(t.shape[2])) != tuple(pieces[0][1].shape[1:]):
            raise bad_arg(where, f"[K, N] = {list(t.shape[1:])}", f"{list(pieces[0][1].shape[1:])} like the first piece")
    E = num_experts_of(pieces)
    wdt = pieces[0][1].dtype
    if dt == FP8_DTYPE:
        if fmt != "fp8_channel":
            raise bad_arg("x", f"dtype {dt}", f"the weights' dtype {wdt} (fp8 x needs fp8 weights with per-channel "
                          "scales)")
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
    if fmt != "bf16":
        if dt not in (torch.bfloat16, FP8_DTYPE):
            raise bad_arg("x", f"dtype {dt}", f"torch.bfloat16 with {fmt} weights (x is quantized inside where "
                          "the format's kernel needs it), or float8_e4m3fn with x_scales")
    elif wdt != dt:
        raise bad_arg("x", f"dtype {dt}", f"the weights' dtype {wdt}", "cast x or the weights; no mixed dtypes")
    if int(x.shape[1]) != K:
        raise bad_arg("x", f"shape {tuple(x.shape)}", f"[num_tokens, K={K}] (K from the weights)")
    rows = int(x.shape[0])
    if x_rows is not None:
        if not isinstance(x_rows, torch.Tensor) or x_rows.dim() != 1 or x_rows.dtype != torch.int64 or \
                x_rows.device != dev:
            raise bad_arg("x_rows", _shape_of(x_rows), f"an int64 [rows] tensor on {dev} (row r reads "
                          "x[x_rows[r] // x_top_k])")
        x_top_k = check_int("x_top_k", x_top_k, low=1)
        if dt == FP8_DTYPE:
            raise bad_arg("x_rows", "a gather", "None for a pre-quantized fp8 x")
        rows = int(x_rows.shape[0])
    groups = m_sizes_or_offsets if isinstance(m_sizes_or_offsets, TokenGroups) else \
        TokenGroups(m_sizes_or_offsets, offsets=offsets)
    if not isinstance(ignore_tail, bool):
        raise bad_type("ignore_tail", ignore_tail, "a bool")
    groups.check(E, rows, ignore_tail=ignore_tail)
    scales = normalize_scales(weight_scales, pieces, fmt, bs) if fmt != "bf16" else None
    if fmt == "bf16" and weight_scales is not None:
        raise bad_arg("weight_scales", "scales", f"None for {wdt} weights (scales are for quantized weights only)")
    odt = torch.bfloat16 if fmt != "bf16" else dt
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise bad_type("out", out, "a torch.Tensor or None")
        want = (rows, N)
        if tuple(out.shape) != want or out.dtype != odt or out.device != dev:
            raise bad_arg("out", f"{tuple(out.shape)} {out.dtype} on {out.device}", f"{want} {odt} on {dev}")
        if not out.is_contiguous():
            raise bad_arg("out", f"strides {out.stride()}", "a contiguous tensor")
    return Problem(x=x, groups=groups, pieces=pieces, scales=scales, out=out, out_dtype=odt,
                   num_experts=E, K=K, N=N, x_scales=x_scales, fmt=fmt, block_size=bs,
                   x_rows=x_rows, x_top_k=int(x_top_k) if x_rows is not None else 1)


def _shape_of(t: Any) -> str:
    return f"{t.dtype} {list(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__


def _weight_format(pieces: list, scales: Any, weight_format: str | None) -> str:
    """The format of logical ``[count, K, N]`` pieces: given (checked by name) or inferred from dtypes."""
    if weight_format is not None:
        fmt = quant.check_format_name(weight_format)
    else:
        wdt = pieces[0][1].dtype
        if wdt == FP8_DTYPE:  # [E, N] scales: per channel; [E, N/bn, K/bk]: block
            fmt = "fp8_block" if _block_scales(scales, pieces) else "fp8_channel"
        elif wdt in (torch.uint8, getattr(torch, "float4_e2m1fn_x2", torch.uint8)):
            fmt = "mxfp4"
        elif wdt in (torch.bfloat16, torch.float32, torch.float16):
            fmt = "bf16"
        else:
            quant.infer_format(pieces[0][1], None, name="weights")  # raises UnsupportedFormatError
            fmt = "bf16"
    return fmt


def _block_scales(scales: Any, pieces: list) -> bool:
    """Whether fp8 ``scales`` (any accepted form) are block scales rather than per-channel ones."""
    if isinstance(scales, torch.Tensor):
        return scales.dim() == 3
    if isinstance(scales, (list, tuple)) and scales:
        s = scales[0][1] if isinstance(scales[0], tuple) and len(scales[0]) == 2 else scales[0]
        if isinstance(s, torch.Tensor):
            if s.dim() != 2:
                return s.dim() == 3
            return int(s.shape[-1]) != int(pieces[0][1].shape[2])  # [count, N]: per channel
    return False


_SCALE_NDIM = {"fp8_channel": 2, "fp8_block": 3, "mxfp4": 3}
_SCALE_SHAPE = {"fp8_channel": "[count, N]", "fp8_block": "[count, ceil(N/bn), ceil(K/bk)]",
                "mxfp4": "[count, N, K/32]"}


def normalize_scales(scales: Any, pieces: list, fmt: str, block_size: tuple = DEFAULT_BLOCK_SIZE, *,
                     name: str = "weight_scales", layout: str = "kn") -> list[torch.Tensor]:
    """One scale tensor per weight piece, checked against the piece in format ``fmt``.

    ``scales``: one ``[E, ...]`` tensor or pieces (any split, :func:`normalize_weights`' forms);
    ``pieces``: the normalised weights, logical ``[count, K, N]`` (``layout="kn"``) or storage
    ``[count, N, K]`` (``"nk"``). Views when the splits match the weights'.
    """
    if scales is None:
        raise bad_arg(name, None, f"{_SCALE_SHAPE[fmt]} scales (or pieces like the weights) for {fmt} weights")
    sp = normalize_weights(scales, name, ndim=_SCALE_NDIM[fmt], shape=_SCALE_SHAPE[fmt])
    out = align_pieces(sp, pieces, name)
    for (first, t), s in zip(pieces, out):
        nk = t.transpose(-1, -2) if layout == "kn" else t
        quant.check_format(nk, s, fmt, block_size=block_size, name=f"weights (experts {first}..{first + t.shape[0] - 1})",
                           scale_name=f"{name} (experts {first}..{first + t.shape[0] - 1})")
    return out

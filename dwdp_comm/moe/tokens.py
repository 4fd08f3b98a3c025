"""Token permutation for routed experts, any router: sort token copies by expert, gather, combine.

Generic (no model-specific routing): the inputs are each token's top-k expert ids and weights,
as every MoE router returns them. Everything here runs on the device without host
synchronisation (no ``.item()`` / ``.tolist()``, no ``bincount``), so a forward stays queued
ahead of the GPU.

Expert ids outside ``[0, num_experts)`` are sentinels (an expert-parallel runtime marks copies
that another rank computes): they sort after every real expert, count in no group, and
contribute nothing to the combine.

- :func:`sort_by_expert` -> :class:`TokenOrder`: the stable order, end offsets per expert, each
  sorted row's expert id, each (token, slot)'s sorted row.
- :func:`gather_tokens`: the sorted copies of the token rows (the grouped GEMM's input).
- :func:`combine_rows`: ``out[t] = sum_j w[t, j] * y[row of (t, j)]`` from one result tensor or
  from per-piece results (no assembly copy).
- :func:`permute_tokens` / :func:`unpermute_tokens`: the classic pair built on those.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..errors import bad_arg, bad_type
from ..checks import check_int
from ..kernels import triton_moe

__all__ = ["TokenOrder", "sort_by_expert", "gather_tokens", "combine_rows", "permute_tokens", "unpermute_tokens"]


@dataclass
class TokenOrder:
    """Token copies sorted by expert (from :func:`sort_by_expert`); every tensor on the ids' device.

    Attributes
    ----------
    order : torch.Tensor
        ``[S]`` int64, ``S = num_tokens * top_k``: sorted row ``i`` is flattened copy ``order[i]``
        (token ``order[i] // top_k``, slot ``order[i] % top_k``). Stable: a token's copies of one
        expert keep their slot order.
    expert_ids : torch.Tensor
        ``[S]`` int32 expert of every sorted row, ascending; sentinel rows (at the end) hold
        ``num_experts``.
    offsets : torch.Tensor
        ``[num_experts]`` int32 end offsets (``torch._grouped_mm``'s ``offs``): expert ``e`` owns
        sorted rows ``[offsets[e-1], offsets[e])``; ``offsets[-1]`` rows are real, the rest sentinels.
    slot_rows : torch.Tensor
        ``[num_tokens, top_k]`` int64 sorted row of every (token, slot), ``-1`` for sentinels.
    num_experts, top_k : int
    """

    order: torch.Tensor
    expert_ids: torch.Tensor
    offsets: torch.Tensor
    slot_rows: torch.Tensor
    num_experts: int
    top_k: int

    @property
    def num_rows(self) -> int:
        """``S``: sorted rows, sentinels included."""
        return int(self.order.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.slot_rows.shape[0])

    def m_sizes(self) -> torch.Tensor:
        """``[num_experts]`` int32 rows per expert, on the device (no sync)."""
        return torch.diff(self.offsets, prepend=self.offsets.new_zeros(1))


def _check_ids(topk_ids: Any, num_experts: Any) -> None:
    if not isinstance(topk_ids, torch.Tensor):
        raise bad_type("topk_ids", topk_ids, "a [num_tokens, top_k] integer torch.Tensor")
    if topk_ids.dim() != 2 or topk_ids.is_floating_point() or topk_ids.is_complex() or topk_ids.dtype == torch.bool:
        raise bad_arg("topk_ids", f"a {topk_ids.dim()}-D {topk_ids.dtype} tensor", "[num_tokens, top_k] integer ids")
    check_int("num_experts", num_experts, low=1)


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int) -> TokenOrder:
    """Sort the ``num_tokens * top_k`` token copies by expert, on the device, without a host sync.

    Parameters
    ----------
    topk_ids : torch.Tensor
        ``[num_tokens, top_k]`` integer expert ids; ids outside ``[0, num_experts)`` are sentinels.
    num_experts : int

    Returns
    -------
    TokenOrder
        Cost: a stable sort of ``S`` int32 keys, a binary search for the offsets, one scatter for
        the inverse; all enqueued on the current stream.
    """
    _check_ids(topk_ids, num_experts)
    t, k = topk_ids.shape
    flat = topk_ids.reshape(-1)
    keys = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts).to(torch.int32)
    expert_ids, order = torch.sort(keys, stable=True)
    bounds = torch.arange(1, num_experts + 1, dtype=torch.int32, device=flat.device)
    offsets = torch.searchsorted(expert_ids, bounds, out_int32=True)  # rows with id < e + 1
    rows = torch.empty_like(order)
    rows[order] = torch.arange(order.numel(), device=order.device)
    slot_rows = torch.where(keys.view(t, k) < num_experts, rows.view(t, k), -1)
    return TokenOrder(order=order, expert_ids=expert_ids, offsets=offsets, slot_rows=slot_rows,
                      num_experts=num_experts, top_k=k)


def gather_tokens(x: torch.Tensor, order: TokenOrder) -> torch.Tensor:
    """``[S, H]`` copies of the token rows in sorted order (sentinel rows included, at the end).

    One ``index_select`` (a read of ``x`` per copy, a write of ``S x H``), on the current stream.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise bad_arg("x", f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__,
                      "[num_tokens, hidden]")
    if x.shape[0] != order.num_tokens:
        raise bad_arg("x", f"{x.shape[0]} rows", f"{order.num_tokens} tokens, as the routing")
    return x.index_select(0, torch.div(order.order, order.top_k, rounding_mode="floor"))


def _pieces(y: Any, order: TokenOrder) -> list[tuple[int, torch.Tensor]]:
    if isinstance(y, torch.Tensor):
        return [(0, y)]
    if isinstance(y, (str, bytes)) or not isinstance(y, Sequence) or not len(y):
        raise bad_type("y", y, "a [S, H] tensor or a non-empty list of (first_row, tensor[rows, H])")
    out, nxt = [], 0
    for i, item in enumerate(y):
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor)):
            raise bad_type(f"y[{i}]", item, "(first_row, tensor[rows, H])")
        r0, t = item
        if int(r0) != nxt:
            raise bad_arg(f"y[{i}][0]", r0, f"{nxt} (pieces cover sorted rows in order, without gaps)")
        out.append((nxt, t))
        nxt += int(t.shape[0])
    return out


def combine_rows(y: Any, order: TokenOrder, weights: torch.Tensor | None = None, *,
                 out_dtype: torch.dtype | None = None, info: dict | None = None) -> torch.Tensor:
    """Sum each token's expert rows back into one row: ``out[t] = sum_j w[t, j] * y[slot_rows[t, j]]``.

    Parameters
    ----------
    y : torch.Tensor or list
        ``[S', H]`` expert outputs in sorted-row order (``S' >= offsets[-1]``: rows past the real
        ones, e.g. never computed sentinel rows, are not read), or pieces
        ``[(first_row, tensor[rows, H]), ...]`` covering rows ``0 .. offsets[-1]`` in order, each
        a separate tensor (per-piece GEMM results: read in place, never assembled on CUDA).
    order : TokenOrder
    weights : torch.Tensor, optional
        ``[num_tokens, top_k]`` combine weights; None when they were already applied to the rows.
    out_dtype : torch.dtype, optional
        Default: ``y``'s dtype.
    info : dict, optional
        Receives ``combine``: ``"triton"`` (one fused pass, CUDA) or ``"torch"`` (gather + sum).

    Returns
    -------
    torch.Tensor
        ``[num_tokens, H]``, accumulated in float32 and rounded once. Sentinel slots add nothing.
        Enqueued on the current stream; no host synchronisation.
    """
    pieces = _pieces(y, order)
    first = pieces[0][1]
    if first.dim() != 2:
        raise bad_arg("y", f"shape {tuple(first.shape)}", "[rows, H]")
    hidden, dt = int(first.shape[1]), first.dtype
    for r0, t in pieces:
        if t.dim() != 2 or int(t.shape[1]) != hidden or t.dtype != dt or t.device != first.device:
            raise bad_arg(f"y (rows from {r0})", f"{tuple(t.shape)} {t.dtype} on {t.device}",
                          f"[rows, {hidden}] {dt} on {first.device}, like the first piece")
    tk = (order.num_tokens, order.top_k)
    if weights is not None and (not isinstance(weights, torch.Tensor) or tuple(weights.shape) != tk):
        raise bad_arg("weights", tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__,
                      f"a {list(tk)} tensor")
    out = torch.empty(order.num_tokens, hidden, dtype=out_dtype or dt, device=first.device)
    rows = order.slot_rows
    use_triton = triton_moe.unavailable_reason(first) is None and all(t.stride() == (hidden, 1) for _, t in pieces)
    if info is not None:
        info["combine"] = "triton" if use_triton else "torch"
    if use_triton:
        es = first.element_size()
        if len(pieces) == 1:
            src = torch.where(rows >= 0, rows * hidden, -1)
        else:
            starts = [r0 for r0, _ in pieces]
            deltas = []
            base = min((t for _, t in pieces), key=lambda t: t.data_ptr())  # offsets >= 0 from the lowest
            for r0, t in pieces:
                d = t.data_ptr() - base.data_ptr()
                assert d % es == 0, "pieces must be aligned to their element size"
                deltas.append(d // es - r0 * hidden)  # element offset of row 0 of the virtual [S, H]
            table = torch.tensor([starts[1:] + [2**62], deltas], dtype=torch.int64,
                                 pin_memory=first.device.type == "cuda").to(first.device, non_blocking=True)
            piece = torch.bucketize(rows, table[0], right=True)
            src = torch.where(rows >= 0, table[1][piece] + rows * hidden, -1)
        w = None if weights is None else weights.contiguous()
        return triton_moe.combine(first if len(pieces) == 1 else base, src.contiguous(), out, w)
    full = first if len(pieces) == 1 else torch.cat([t for _, t in pieces])
    valid = (rows >= 0).unsqueeze(-1)
    g = full.index_select(0, rows.clamp(min=0).reshape(-1)).view(*tk, hidden)
    g = torch.where(valid, g, 0)  # never-computed rows may hold NaN: 0 * NaN is NaN
    if weights is None:
        return out.copy_(g.sum(dim=1, dtype=torch.float32))
    return out.copy_(torch.einsum("tk,tkh->th", weights.float(), g.float()))


def permute_tokens(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, *, return_expert_ids: bool = False):
    """Group token copies by expert (stable), for a grouped GEMM.

    Parameters
    ----------
    x : torch.Tensor
        ``[num_tokens, hidden]``.
    topk_ids : torch.Tensor
        ``[num_tokens, top_k]`` integer expert ids; ids outside ``[0, num_experts)`` are sentinels:
        their copies sort last and count in no expert.
    num_experts : int
    return_expert_ids : bool
        Also return the expert of every sorted row.

    Returns
    -------
    x_sorted : torch.Tensor
        ``[num_tokens * top_k, hidden]``: rows of expert 0 first, then expert 1, ..., sentinels last.
    m_sizes : torch.Tensor
        ``[num_experts]`` int32 rows per expert, on the device (summing to ``S`` minus sentinels).
    order : torch.Tensor
        ``[num_tokens * top_k]`` int64: row ``i`` of ``x_sorted`` is copy ``order[i]`` of the
        flattened ``(token, k)`` pairs (token ``order[i] // top_k``).
    expert_ids : torch.Tensor
        Only with ``return_expert_ids``: ``[num_tokens * top_k]`` int32, ``num_experts`` for sentinels.

    Notes
    -----
    No host synchronisation; :func:`sort_by_expert` and :func:`gather_tokens` give the full
    :class:`TokenOrder` for :func:`combine_rows`.
    """
    o = sort_by_expert(topk_ids, num_experts)
    res = (gather_tokens(x, o), o.m_sizes(), o.order)
    return res + (o.expert_ids,) if return_expert_ids else res


def unpermute_tokens(y_sorted: torch.Tensor, order: torch.Tensor, topk_weights: torch.Tensor, *,
                     num_rows: Any = None) -> torch.Tensor:
    """Weighted sum of each token's expert outputs: the inverse of :func:`permute_tokens`.

    Parameters
    ----------
    y_sorted : torch.Tensor
        ``[num_tokens * top_k, n]`` expert outputs in ``x_sorted`` order.
    order : torch.Tensor
        From :func:`permute_tokens`.
    topk_weights : torch.Tensor
        ``[num_tokens, top_k]`` combine weights.
    num_rows : int or torch.Tensor, optional
        Rows of ``y_sorted`` that are real (``m_sizes.sum()``, a host int or a one-element device
        tensor); the rest (sentinel copies) add nothing. Default: all.

    Returns
    -------
    torch.Tensor
        ``[num_tokens, n]`` in ``y_sorted``'s dtype (accumulated in float32).
    """
    if not isinstance(topk_weights, torch.Tensor) or topk_weights.dim() != 2:
        raise bad_arg("topk_weights", type(topk_weights).__name__ if not isinstance(topk_weights, torch.Tensor)
                      else f"shape {tuple(topk_weights.shape)}", "[num_tokens, top_k]")
    t, k = topk_weights.shape
    if order.numel() != t * k or y_sorted.shape[0] != t * k:
        raise bad_arg("order/y_sorted", f"{order.numel()} / {y_sorted.shape[0]} rows", f"{t * k} (num_tokens * top_k)")
    rows = torch.empty_like(order)
    rows[order] = torch.arange(order.numel(), device=order.device)
    if num_rows is not None:
        rows = torch.where(rows < num_rows, rows, -1)
    o = TokenOrder(order=order, expert_ids=order.new_empty(0, dtype=torch.int32), offsets=order.new_empty(0),
                   slot_rows=rows.view(t, k), num_experts=0, top_k=k)
    return combine_rows(y_sorted, o, topk_weights)

"""DeepSeek-V3 routing and token permutation (plain torch, any device)."""

from __future__ import annotations

import torch

from ..errors import bad_arg

__all__ = ["route_deepseek", "permute_tokens", "unpermute_tokens"]


def route_deepseek(logits: torch.Tensor, bias: torch.Tensor | None, *, top_k: int = 8, num_groups: int = 8,
                   topk_groups: int = 4, routed_scaling: float = 2.5, normalize: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 router: sigmoid scores, group-limited top-k, renormalised and scaled weights.

    Each group's score is the sum of its two best (bias-corrected) expert scores; the best
    ``topk_groups`` groups are kept and the ``top_k`` best experts among them chosen. The bias only
    steers the choice; the combine weights come from the plain sigmoid scores.

    Parameters
    ----------
    logits : torch.Tensor
        ``[num_tokens, num_experts]`` router logits (any float dtype; computed in float32).
    bias : torch.Tensor or None
        ``[num_experts]`` score-correction bias (``e_score_correction_bias``).
    top_k, num_groups, topk_groups : int
        DeepSeek-V3: 8, 8, 4.
    routed_scaling : float
        Multiplies the weights (DeepSeek-V3: 2.5).
    normalize : bool
        Divide each token's weights by their sum before scaling.

    Returns
    -------
    topk_ids : torch.Tensor
        ``[num_tokens, top_k]`` int64 expert ids.
    topk_weights : torch.Tensor
        ``[num_tokens, top_k]`` float32 combine weights.
    """
    if logits.dim() != 2:
        raise bad_arg("logits", f"shape {tuple(logits.shape)}", "[num_tokens, num_experts]")
    t, e = logits.shape
    if e % num_groups:
        raise bad_arg("num_groups", num_groups, f"a divisor of num_experts={e}")
    if not 1 <= topk_groups <= num_groups or not 1 <= top_k <= topk_groups * (e // num_groups):
        raise bad_arg("top_k/topk_groups", (top_k, topk_groups), f"top_k <= topk_groups * {e // num_groups}")
    scores = logits.float().sigmoid()
    choice = scores if bias is None else scores + bias.float().view(1, e)
    per_group = choice.view(t, num_groups, e // num_groups)
    group_score = per_group.topk(min(2, e // num_groups), dim=-1).values.sum(-1)
    keep = group_score.topk(topk_groups, dim=-1).indices
    mask = torch.zeros(t, num_groups, dtype=torch.bool, device=logits.device).scatter_(1, keep, True)
    masked = choice.masked_fill(~mask.repeat_interleave(e // num_groups, dim=1), float("-inf"))
    ids = masked.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
    return ids, weights * routed_scaling


def permute_tokens(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group token copies by expert (stable), for a grouped GEMM.

    Parameters
    ----------
    x : torch.Tensor
        ``[num_tokens, hidden]``.
    topk_ids : torch.Tensor
        ``[num_tokens, top_k]`` int64 expert ids in ``[0, num_experts)``.

    Returns
    -------
    x_sorted : torch.Tensor
        ``[num_tokens * top_k, hidden]``: rows of expert 0 first, then expert 1, ...
    m_sizes : torch.Tensor
        ``[num_experts]`` int64 rows per expert.
    order : torch.Tensor
        ``[num_tokens * top_k]`` int64: row ``i`` of ``x_sorted`` is copy ``order[i]`` of the
        flattened ``(token, k)`` pairs (token ``order[i] // top_k``).
    """
    flat = topk_ids.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    m_sizes = torch.bincount(flat, minlength=num_experts)
    return x[order // topk_ids.shape[1]], m_sizes, order


def unpermute_tokens(y_sorted: torch.Tensor, order: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each token's expert outputs: the inverse of :func:`permute_tokens`.

    Parameters
    ----------
    y_sorted : torch.Tensor
        ``[num_tokens * top_k, n]`` expert outputs in ``x_sorted`` order.
    order : torch.Tensor
        From :func:`permute_tokens`.
    topk_weights : torch.Tensor
        ``[num_tokens, top_k]`` combine weights.

    Returns
    -------
    torch.Tensor
        ``[num_tokens, n]`` in ``y_sorted``'s dtype (accumulated in float32).
    """
    t, k = topk_weights.shape
    w = topk_weights.reshape(-1)[order].unsqueeze(1)
    out = torch.zeros(t, y_sorted.shape[1], dtype=torch.float32, device=y_sorted.device)
    out.index_add_(0, order // k, y_sorted.float() * w)
    return out.to(y_sorted.dtype)

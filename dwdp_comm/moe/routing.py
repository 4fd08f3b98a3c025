"""DeepSeek-V3 routing (plain torch, any device).

The token permutation moved to :mod:`dwdp_comm.moe.tokens` (router-independent); it is re-exported
here for existing callers.
"""

from __future__ import annotations

import torch

from ..errors import bad_arg
from .tokens import permute_tokens, unpermute_tokens  # noqa: F401  (re-export: moved to .tokens)

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

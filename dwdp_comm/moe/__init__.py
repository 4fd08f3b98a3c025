"""MoE layers built on dwdp_comm: DWDP (prefetched experts) and the DEP baseline, DeepSeek-V3 pieces."""

from .deepseek import DEEPSEEK_V3, TOY, DeepseekConfig, MLAttention, attention_weights, rms_norm
from .layers import (EXPERT_NAMES, DepMoE, DwdpMoE, DwdpPipeline, expert_weights, reference_moe, router_weights,
                     shared_expert_weights)
from .routing import route_deepseek
from .tokens import TokenOrder, combine_rows, gather_tokens, permute_tokens, sort_by_expert, unpermute_tokens
from .experts import experts_forward, experts_forward_reference

__all__ = ["DwdpMoE", "DepMoE", "DwdpPipeline", "expert_weights", "router_weights", "shared_expert_weights",
           "reference_moe", "EXPERT_NAMES", "route_deepseek", "permute_tokens", "unpermute_tokens",
           "TokenOrder", "sort_by_expert", "gather_tokens", "combine_rows", "experts_forward", "experts_forward_reference",
           "DeepseekConfig", "DEEPSEEK_V3", "TOY", "MLAttention", "attention_weights", "rms_norm"]

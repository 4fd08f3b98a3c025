"""MoE layers built on dwdp_comm: DWDP (prefetched experts) and the DEP baseline, DeepSeek-V3 pieces.

Public (``__all__``, docs/api.md): :class:`DwdpPipeline` (keeps ``depth`` MoE layers' prefetches in
flight; CUDA-graph capture), :func:`experts_forward` (an MoE layer's experts over local, prefetched
or split weights) and its float64 oracle :func:`experts_forward_reference`. The DeepSeek-V3 layers,
routing and token helpers the example and the benchmarks use (``DwdpMoE``, ``DepMoE``,
``permute_tokens``, ...) are importable from here too; docs/internals.md documents them.
"""

# Importable from dwdp_comm.moe for the example and the benchmarks, not in __all__ (internals):
from .deepseek import DEEPSEEK_V3, TOY, DeepseekConfig, MLAttention, attention_weights, rms_norm  # noqa: F401
from .layers import (EXPERT_NAMES, DepMoE, DwdpMoE, expert_weights, reference_moe, router_weights,  # noqa: F401
                     shared_expert_weights)
from .routing import route_deepseek  # noqa: F401
from .tokens import (TokenOrder, combine_rows, gather_tokens, permute_tokens, sort_by_expert,  # noqa: F401
                     unpermute_tokens)
# Public:
from .experts import experts_forward, experts_forward_reference
from .pipeline import DwdpPipeline

__all__ = ["DwdpPipeline", "experts_forward", "experts_forward_reference"]

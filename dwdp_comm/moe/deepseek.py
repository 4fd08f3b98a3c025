"""DeepSeek-V3 decoder-layer pieces at any size: config, seeded random weights, MLA attention.

Weights are random but reproducible: every tensor is drawn from a generator seeded by (seed,
layer, tensor name[, expert]), so any rank can rebuild any expert's weights (for the reference
check) without communication. Values are scaled by ``1/sqrt(fan_in)`` so activations stay
bounded through several layers in bf16.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

__all__ = ["DeepseekConfig", "DEEPSEEK_V3", "TOY", "seeded_weight", "rms_norm", "MLAttention", "attention_weights"]


@dataclass(frozen=True)
class DeepseekConfig:
    """DeepSeek-V3 architecture numbers (defaults: the real model)."""

    hidden: int = 7168
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    num_heads: int = 128
    qk_nope_dim: int = 128
    qk_rope_dim: int = 64
    v_head_dim: int = 128
    num_experts: int = 256
    moe_intermediate: int = 2048
    num_shared_experts: int = 1
    top_k: int = 8
    num_groups: int = 8
    topk_groups: int = 4
    routed_scaling: float = 2.5
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0

    @property
    def qk_head_dim(self) -> int:
        """Query/key head size: nope + rope parts."""
        return self.qk_nope_dim + self.qk_rope_dim

    def scaled(self, **changes) -> "DeepseekConfig":
        """A copy with some fields changed (e.g. fewer experts for a smaller run)."""
        return replace(self, **changes)


DEEPSEEK_V3 = DeepseekConfig()
# A toy size with the same structure, for CPU runs on the sim backend.
TOY = DeepseekConfig(hidden=64, q_lora_rank=32, kv_lora_rank=16, num_heads=4, qk_nope_dim=8, qk_rope_dim=8,
                     v_head_dim=8, num_experts=16, moe_intermediate=32, top_k=4, num_groups=4, topk_groups=2)


def seeded_weight(seed: int, layer: int, name: str, shape: tuple[int, ...], *, fan_in: int,
                  device="cpu", dtype=torch.bfloat16, expert: int = -1) -> torch.Tensor:
    """A reproducible random tensor ``N(0, 1/fan_in)`` of ``shape``, drawn on ``device``."""
    key = (seed * 1_000_003 + layer * 100_019 + zlib.crc32(name.encode()) * 1_009 + expert + 1) % (2**63)
    g = torch.Generator(device=device).manual_seed(key)
    w = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
    return (w * (1.0 / math.sqrt(fan_in))).to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in float32, returned in ``x``'s dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding on the last dim of ``x`` ``[T, heads, d]`` (d even; halves rotated)."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = positions.float().unsqueeze(1) * inv.unsqueeze(0)  # [T, d/2]
    cos, sin = ang.cos().unsqueeze(1), ang.sin().unsqueeze(1)
    x1, x2 = x.float()[..., : d // 2], x.float()[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def attention_weights(cfg: DeepseekConfig, seed: int, layer: int, device="cpu", dtype=torch.bfloat16) -> dict:
    """MLA and norm weights of one layer (replicated on every rank in DWDP and DEP)."""
    h, nh = cfg.hidden, cfg.num_heads
    w = lambda name, shape, fan_in: seeded_weight(seed, layer, name, shape, fan_in=fan_in, device=device, dtype=dtype)
    return {
        "q_a": w("q_a", (cfg.q_lora_rank, h), h),
        "q_b": w("q_b", (nh * cfg.qk_head_dim, cfg.q_lora_rank), cfg.q_lora_rank),
        "kv_a": w("kv_a", (cfg.kv_lora_rank + cfg.qk_rope_dim, h), h),
        "kv_b": w("kv_b", (nh * (cfg.qk_nope_dim + cfg.v_head_dim), cfg.kv_lora_rank), cfg.kv_lora_rank),
        "o": w("o", (h, nh * cfg.v_head_dim), nh * cfg.v_head_dim),
        "q_norm": torch.ones(cfg.q_lora_rank, device=device, dtype=dtype),
        "kv_norm": torch.ones(cfg.kv_lora_rank, device=device, dtype=dtype),
        "attn_norm": torch.ones(h, device=device, dtype=dtype),
        "ffn_norm": torch.ones(h, device=device, dtype=dtype),
    }


class MLAttention:
    """Multi-head latent attention (DeepSeek-V3), prefill form, causal within each request.

    Parameters
    ----------
    cfg : DeepseekConfig
    weights : dict
        From :func:`attention_weights`.
    """

    def __init__(self, cfg: DeepseekConfig, weights: dict):
        self.cfg, self.w = cfg, weights

    def __call__(self, x: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        """``x`` ``[num_tokens, hidden]`` (requests back to back, lengths ``seq_lens``) -> same shape."""
        cfg, w = self.cfg, self.w
        t, nh = x.shape[0], cfg.num_heads
        q = F.linear(rms_norm(F.linear(x, w["q_a"]), w["q_norm"], cfg.rms_eps), w["q_b"]).view(t, nh, cfg.qk_head_dim)
        kv_a = F.linear(x, w["kv_a"])
        c_kv, k_pe = kv_a.split([cfg.kv_lora_rank, cfg.qk_rope_dim], dim=-1)
        kv = F.linear(rms_norm(c_kv, w["kv_norm"], cfg.rms_eps), w["kv_b"]).view(t, nh, cfg.qk_nope_dim + cfg.v_head_dim)
        k_nope, v = kv.split([cfg.qk_nope_dim, cfg.v_head_dim], dim=-1)
        positions = torch.cat([torch.arange(n, device=x.device) for n in seq_lens])
        q_nope, q_pe = q.split([cfg.qk_nope_dim, cfg.qk_rope_dim], dim=-1)
        q_pe = _rope(q_pe, positions, cfg.rope_theta)
        k_pe = _rope(k_pe.unsqueeze(1), positions, cfg.rope_theta).expand(t, nh, cfg.qk_rope_dim)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe], dim=-1)
        # Pad v (128) to the q/k head dim (192) with zeros, dropped from the output: flash attention
        # takes one head dim for q, k and v. SDPA's math path materialises [heads, n, n] scores (8 GiB
        # at n = 5.8K) and ran out of memory at real lengths (H200 sweep of f5666dd).
        pad = cfg.qk_head_dim - cfg.v_head_dim
        if pad > 0:
            v = F.pad(v, (0, pad))
        out = torch.empty(t, nh, cfg.v_head_dim, device=x.device, dtype=x.dtype)
        start = 0
        for n in seq_lens:  # requests are independent: causal attention inside each
            sl = slice(start, start + n)
            # [1, heads, n, dim]: torch's fused kernels (flash, memory-efficient, cuDNN) take 4-d inputs
            # only; 3-d inputs fall back to the math path (seen on H200, torch 2.11: perf/probe_sdpa.py).
            q4, k4, v4 = (a[sl].transpose(0, 1).unsqueeze(0) for a in (q, k, v))
            o = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=1.0 / math.sqrt(cfg.qk_head_dim))
            out[sl] = o[0].transpose(0, 1)[..., :cfg.v_head_dim]
            start += n
        return F.linear(out.reshape(t, nh * cfg.v_head_dim), w["o"])

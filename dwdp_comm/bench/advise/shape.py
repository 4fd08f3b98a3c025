"""What is run: an MoE decoder layer's shape (presets, HF ``config.json``) and the per-rank load."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from statistics import NormalDist
from typing import Sequence

from ...errors import bad_arg, bad_type

__all__ = ["MoEShape", "PRESETS", "shape_from_hf_config", "get_shape", "Load", "load_from"]


@dataclass(frozen=True)
class MoEShape:
    """The numbers of one MoE decoder layer that decide its cost.

    Attributes
    ----------
    name : str
    hidden, moe_intermediate, num_experts, top_k : int
    num_shared_experts : int
        Shared experts (width ``shared_intermediate``, default ``moe_intermediate``).
    num_layers : int
        MoE layers of the model (memory per rank).
    attention : {"mla", "gqa"}
    num_heads, num_kv_heads, head_dim : int
        GQA: query heads, key/value heads, head size. MLA: ``num_heads`` only.
    q_lora_rank, kv_lora_rank, qk_nope_dim, qk_rope_dim, v_head_dim : int
        MLA only (DeepSeek-V3 names).
    """

    name: str
    hidden: int
    moe_intermediate: int
    num_experts: int
    top_k: int
    num_shared_experts: int = 0
    shared_intermediate: int | None = None
    num_layers: int = 1
    attention: str = "gqa"
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_dim: int = 0
    qk_rope_dim: int = 0
    v_head_dim: int = 0

    def __post_init__(self):
        for k in ("hidden", "moe_intermediate", "num_experts", "top_k", "num_layers", "num_heads"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad_arg(k, v, "an int >= 1")
        if self.top_k > self.num_experts:
            raise bad_arg("top_k", self.top_k, f"<= num_experts ({self.num_experts})")
        if self.attention not in ("mla", "gqa"):
            raise bad_arg("attention", self.attention, "'mla' or 'gqa'")
        if self.attention == "mla" and min(self.kv_lora_rank, self.qk_nope_dim + self.qk_rope_dim,
                                           self.v_head_dim) < 1:
            raise bad_arg("attention", "mla", "kv_lora_rank, qk_nope_dim + qk_rope_dim and v_head_dim >= 1")

    def expert_nbytes(self, weights: str) -> int:
        """Bytes of one routed expert's gate, up and down matrices (fp8: 1 byte a weight plus
        float32 per-channel scales)."""
        n = 3 * self.hidden * self.moe_intermediate
        if weights == "bf16":
            return 2 * n
        if weights == "fp8":
            return n + 4 * (2 * self.moe_intermediate + self.hidden)
        raise bad_arg("weights", weights, "'bf16' or 'fp8'")

    def attention_params(self) -> int:
        """Weights of the attention projections (multiply-adds per token)."""
        h, nh = self.hidden, self.num_heads
        if self.attention == "mla":
            qk = self.qk_nope_dim + self.qk_rope_dim
            q = h * self.q_lora_rank + self.q_lora_rank * nh * qk if self.q_lora_rank else h * nh * qk
            kv = h * (self.kv_lora_rank + self.qk_rope_dim) + self.kv_lora_rank * nh * (self.qk_nope_dim + self.v_head_dim)
            return q + kv + nh * self.v_head_dim * h
        hd = self.head_dim
        return h * nh * hd + 2 * h * self.num_kv_heads * hd + nh * hd * h

    def attention_core_macs(self, seq_len: int) -> float:
        """Multiply-adds of causal scores and values for one sequence of ``seq_len`` tokens."""
        if self.attention == "mla":
            per = self.qk_nope_dim + self.qk_rope_dim + self.v_head_dim
        else:
            per = 2 * self.head_dim
        return self.num_heads * per * seq_len * (seq_len + 1) / 2


def _deepseek_v3() -> MoEShape:
    from ...moe import DEEPSEEK_V3 as c
    return MoEShape(name="deepseek-v3", hidden=c.hidden, moe_intermediate=c.moe_intermediate,
                    num_experts=c.num_experts, top_k=c.top_k, num_shared_experts=c.num_shared_experts,
                    num_layers=58, attention="mla", num_heads=c.num_heads, q_lora_rank=c.q_lora_rank,
                    kv_lora_rank=c.kv_lora_rank, qk_nope_dim=c.qk_nope_dim, qk_rope_dim=c.qk_rope_dim,
                    v_head_dim=c.v_head_dim)


# Qwen3 MoE numbers from their published config.json files (Qwen/Qwen3-235B-A22B, Qwen/Qwen3-30B-A3B).
PRESETS = {
    "deepseek-v3": _deepseek_v3,
    "qwen3-235b-a22b": lambda: MoEShape(name="qwen3-235b-a22b", hidden=4096, moe_intermediate=1536, num_experts=128,
                                        top_k=8, num_layers=94, attention="gqa", num_heads=64, num_kv_heads=4,
                                        head_dim=128),
    "qwen3-30b-a3b": lambda: MoEShape(name="qwen3-30b-a3b", hidden=2048, moe_intermediate=768, num_experts=128,
                                      top_k=8, num_layers=48, attention="gqa", num_heads=32, num_kv_heads=4,
                                      head_dim=128),
}
PRESETS["qwen3-moe"] = PRESETS["qwen3-235b-a22b"]


def shape_from_hf_config(path_or_dict: str | dict) -> MoEShape:
    """A :class:`MoEShape` from a Hugging Face ``config.json`` (DeepSeek-V2/V3 or Qwen2/3-MoE keys)."""
    if isinstance(path_or_dict, dict):
        cfg, name = path_or_dict, "hf-config"
    else:
        try:
            with open(path_or_dict) as f:
                cfg = json.load(f)
        except (OSError, ValueError) as exc:
            raise bad_arg("model", path_or_dict, "a readable HF config.json", str(exc)) from None
        name = os.path.basename(os.path.dirname(os.path.abspath(path_or_dict))) or "hf-config"
    get = lambda *keys, default=None: next((cfg[k] for k in keys if cfg.get(k) is not None), default)
    experts = get("n_routed_experts", "num_experts", "num_local_experts")
    missing = [k for k, v in (("hidden_size", get("hidden_size")), ("moe_intermediate_size",
                                                                    get("moe_intermediate_size")),
                              ("n_routed_experts/num_experts", experts),
                              ("num_experts_per_tok", get("num_experts_per_tok"))) if v is None]
    if missing:
        raise bad_arg("model", path_or_dict if not isinstance(path_or_dict, dict) else "config",
                      "an MoE config.json", f"missing {', '.join(missing)}")
    layers = int(get("num_hidden_layers", default=1)) - int(get("first_k_dense_replace", default=0))
    mla = cfg.get("kv_lora_rank") is not None
    shared = int(get("n_shared_experts", default=0))
    shared_i = None
    if not shared and get("shared_expert_intermediate_size"):
        shared, shared_i = 1, int(cfg["shared_expert_intermediate_size"])
    heads = int(get("num_attention_heads", default=1))
    common = dict(name=str(get("_name_or_path", default=name)), hidden=int(cfg["hidden_size"]),
                  moe_intermediate=int(cfg["moe_intermediate_size"]), num_experts=int(experts),
                  top_k=int(cfg["num_experts_per_tok"]), num_shared_experts=shared, shared_intermediate=shared_i,
                  num_layers=max(layers, 1), num_heads=heads)
    if mla:
        return MoEShape(attention="mla", q_lora_rank=int(get("q_lora_rank", default=0) or 0),
                        kv_lora_rank=int(cfg["kv_lora_rank"]), qk_nope_dim=int(get("qk_nope_head_dim", default=0)),
                        qk_rope_dim=int(get("qk_rope_head_dim", default=0)), v_head_dim=int(get("v_head_dim", default=0)),
                        **common)
    hd = int(get("head_dim", default=int(cfg["hidden_size"]) // heads))
    return MoEShape(attention="gqa", num_kv_heads=int(get("num_key_value_heads", default=heads)), head_dim=hd, **common)


def get_shape(model: str | MoEShape | dict) -> MoEShape:
    """A preset name, a path to a config.json, a dict of :class:`MoEShape` fields, or a shape."""
    if isinstance(model, MoEShape):
        return model
    if isinstance(model, dict):
        try:
            return MoEShape(**{"name": "custom", **model})
        except TypeError as exc:
            raise bad_arg("model", model, "MoEShape fields", str(exc)) from None
    if not isinstance(model, str):
        raise bad_type("model", model, "str, dict or MoEShape")
    if model.lower() in PRESETS:
        return PRESETS[model.lower()]()
    if os.path.exists(model):
        return shape_from_hf_config(model)
    raise bad_arg("model", model, f"a preset in {sorted(PRESETS)} or a path to a HF config.json")


# ---- load -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Load:
    """Tokens each rank prefills in one iteration (``tokens[r]``), and the prompt length."""

    tokens: tuple[int, ...]
    seq_len: int | None = None  # None: one sequence per rank (its whole token count)

    @property
    def mean(self) -> float:
        return sum(self.tokens) / len(self.tokens)

    def seq_lens(self, t: int) -> list[int]:
        """``t`` tokens as back-to-back prompts of ``seq_len`` (the last one shorter)."""
        s = self.seq_len or t
        return [s] * (t // s) + ([t % s] if t % s else [])


def load_from(group_size: int, mean: float | None = None, cv: float = 0.0, tokens: Sequence[int] | None = None,
              seq_len: int | None = None) -> Load:
    """A deterministic load: ``tokens`` as given, or ``mean x (1 + cv z_r)`` with ``z_r`` the normal
    quantiles at ``(r + 0.5) / G`` (so the sample has the asked mean; clipped at 1 token)."""
    if tokens is not None:
        tokens = [int(t) for t in tokens]
        if len(tokens) != group_size or min(tokens) < 1:
            raise bad_arg("tokens", tokens, f"{group_size} token counts >= 1 (one per rank)")
        return Load(tuple(tokens), seq_len)
    if mean is None or not mean >= 1:
        raise bad_arg("mean", mean, "tokens per rank >= 1")
    if not cv >= 0:
        raise bad_arg("cv", cv, "a coefficient of variation >= 0")
    nd = NormalDist()
    z = [nd.inv_cdf((r + 0.5) / group_size) for r in range(group_size)] if group_size > 1 else [0.0]
    return Load(tuple(max(1, round(mean * (1 + cv * zr))) for zr in z), seq_len)


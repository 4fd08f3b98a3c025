"""Tiny random configs of the Hugging Face MoE families (tests, examples, smoke runs; no hub access).

>>> cfg = tiny_config("mixtral", num_experts=5, num_layers=3)
>>> model = transformers.AutoModelForCausalLM.from_config(cfg)
"""

from __future__ import annotations

from ..errors import bad_arg

__all__ = ["FAMILIES", "tiny_config"]

FAMILIES = ("mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "olmoe", "qwen2_moe")

# small enough for a CPU test in milliseconds, large enough for GQA, several heads and a real vocab row gather
_BASE = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _family_kwargs(family: str, num_experts: int, num_layers: int) -> dict:
    if family == "mixtral":
        return dict(intermediate_size=16, num_local_experts=num_experts, num_experts_per_tok=2)
    if family == "qwen3_moe":
        return dict(intermediate_size=24, moe_intermediate_size=16, num_experts=num_experts, num_experts_per_tok=2,
                    head_dim=8, decoder_sparse_step=1, mlp_only_layers=[])
    if family == "deepseek_v3":
        return dict(intermediate_size=24, moe_intermediate_size=16, n_routed_experts=num_experts, num_experts_per_tok=2,
                    n_group=1, topk_group=1, first_k_dense_replace=0, n_shared_experts=1, q_lora_rank=16,
                    kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)
    if family == "gpt_oss":
        # alternating sliding / full attention, as the real model
        return dict(intermediate_size=16, num_local_experts=num_experts, num_experts_per_tok=2, head_dim=8,
                    sliding_window=16,
                    layer_types=[("sliding_attention", "full_attention")[i % 2] for i in range(num_layers)])
    if family == "olmoe":
        return dict(intermediate_size=16, num_experts=num_experts, num_experts_per_tok=2)
    if family == "qwen2_moe":
        return dict(intermediate_size=24, moe_intermediate_size=16, num_experts=num_experts, num_experts_per_tok=2,
                    shared_expert_intermediate_size=16, decoder_sparse_step=1, mlp_only_layers=[])
    raise bad_arg("family", repr(family), f"one of {FAMILIES}")


def tiny_config(family: str, *, num_experts: int = 5, num_layers: int = 2, **overrides):
    """A tiny random config of one HF MoE family.

    Parameters
    ----------
    family : str
        One of :data:`FAMILIES` (``"mixtral"``, ``"qwen3_moe"``, ``"deepseek_v3"``, ``"gpt_oss"``,
        ``"olmoe"``, ``"qwen2_moe"``).
    num_experts : int
        Routed experts per MoE layer.
    num_layers : int
        Decoder layers (every one an MoE layer).
    **overrides
        Any config field, applied last (e.g. ``hidden_size=64``, ``tie_word_embeddings=True``).

    Returns
    -------
    transformers.PretrainedConfig
        hidden 32, vocab 96, 4 heads (2 KV heads), expert intermediate 16, top-2 routing.
    """
    import transformers as tf
    classes = {"mixtral": tf.MixtralConfig, "qwen3_moe": tf.Qwen3MoeConfig, "deepseek_v3": tf.DeepseekV3Config,
               "gpt_oss": tf.GptOssConfig, "olmoe": tf.OlmoeConfig, "qwen2_moe": tf.Qwen2MoeConfig}
    kwargs = dict(_BASE, num_hidden_layers=num_layers, **_family_kwargs(family, num_experts, num_layers))
    kwargs.update(overrides)
    return classes[family](**kwargs)

"""Rank functions of the Hugging Face integration tests (module-level: dwdp_comm.testing.launch pickles them)."""

from __future__ import annotations

import torch

TINY = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64)


def tiny_config(family: str, num_experts: int = 5):
    """A tiny random config of an HF MoE family (no hub access)."""
    import transformers as tf
    if family == "mixtral":
        return tf.MixtralConfig(**TINY, intermediate_size=16, num_local_experts=num_experts, num_experts_per_tok=2)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**TINY, intermediate_size=24, moe_intermediate_size=16, num_experts=num_experts,
                                 num_experts_per_tok=2, head_dim=8, decoder_sparse_step=1, mlp_only_layers=[])
    if family == "deepseek_v3":
        return tf.DeepseekV3Config(**TINY, intermediate_size=24, moe_intermediate_size=16, n_routed_experts=num_experts,
                                   num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=0,
                                   n_shared_experts=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4,
                                   qk_nope_head_dim=4, v_head_dim=8)
    if family == "gpt_oss":
        return tf.GptOssConfig(**TINY, intermediate_size=16, num_local_experts=num_experts, num_experts_per_tok=2,
                               head_dim=8, sliding_window=16, layer_types=["sliding_attention", "full_attention"])
    if family == "olmoe":
        return tf.OlmoeConfig(**TINY, intermediate_size=16, num_experts=num_experts, num_experts_per_tok=2)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(**TINY, intermediate_size=24, moe_intermediate_size=16, num_experts=num_experts,
                                 num_experts_per_tok=2, shared_expert_intermediate_size=16, decoder_sparse_step=1,
                                 mlp_only_layers=[])
    raise ValueError(family)


def build(family: str, seed: int, num_experts: int = 5):
    """The same random float32 model on every rank (seeded)."""
    import transformers as tf
    torch.manual_seed(seed)
    cfg = tiny_config(family, num_experts)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # HF zero-initialises some expert biases: make them random so they are tested
        for n, p in model.named_parameters():
            if "experts" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    return model


def compare(group, family: str, seed: int, num_experts: int = 5, method=None):
    """DWDP vs the unmodified HF model: logits, generate() tokens, freed rows, delivered bytes, aborted forward."""
    from dwdp_comm.integrations.transformers import convert, find_experts
    torch.set_num_threads(1)
    dev = group.device  # cpu on sim; the rank's GPU on cuda_ipc
    ref = build(family, seed, num_experts).to(dev)
    model = build(family, seed, num_experts).to(dev)
    ids = torch.randint(0, ref.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(seed)).to(dev)
    with torch.no_grad():
        want = ref(ids).logits
        want_tokens = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, min_new_tokens=4)
    full = {(s.layer, n): getattr(s.module, n).detach().clone() for s in find_experts(ref) for n in s.names}
    # poison the rows this rank does not own: DWDP must never read them from the model
    layout_rows = None
    with torch.no_grad():
        from dwdp_comm.layout import ExpertLayout
        lay = ExpertLayout(num_experts, group.size, group.rank)
        layout_rows = lay.local_experts
        for s in find_experts(model):
            for n in s.names:
                t = getattr(s.module, n)
                keep = t[layout_rows.start:layout_rows.stop].clone()
                t.fill_(float("nan"))
                t[layout_rows.start:layout_rows.stop] = keep
    dm = convert(model, group, depth=2, chunk_nbytes=512, method=method)
    out = {"methods": sorted({s.method for s in dm.sites}), "gates": sorted({str(s.gate)[:20] for s in dm.sites}),
           "memory": dm.memory}
    with dm, torch.no_grad():
        freed = all(getattr(s.module, n).device.type == "meta" for s in dm.sites for n in s.names)
        got = model(ids).logits
        out["logits_max_diff"] = float((got - want).abs().max())
        got_tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, min_new_tokens=4)
        out["tokens_equal"] = bool(torch.equal(got_tokens, want_tokens))
        # abort a forward between layers, then a good one
        second = dm.sites[-1].module  # layer 0 ran, the forward dies before the last layer acquires
        real = second.dwdp_run

        def boom(*a):
            raise RuntimeError("abort between layers")
        second.dwdp_run = boom
        try:
            model(ids)
            out["aborted"] = False
        except RuntimeError:
            out["aborted"] = True
        second.dwdp_run = real
        out["after_abort_max_diff"] = float((model(ids).logits - want).abs().max())
        # every delivered row byte-exact
        exact = True
        dm.pipeline.begin()
        for s in dm.sites:
            h = dm.pipeline.acquire(s.layer)
            for n in s.names:
                w = h.weights(n)
                exact &= bool(torch.equal(w.view(torch.uint8), full[(s.layer, n)].view(torch.uint8)))
            dm.pipeline.release(h)
        out["bytes_exact"] = exact
        out["freed"] = freed
        out["stats"] = dm.stats()
    return out


def bad_convert(group, what: str):
    """convert() with bad input on one rank only: every rank must raise."""
    import transformers as tf
    from dwdp_comm.integrations.transformers import convert
    model = build("mixtral", 0)
    kwargs = {"free": "everything"} if what == "free" and group.rank == 1 else {}
    if what == "dense":
        model = tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(**TINY, intermediate_size=16))
    try:
        convert(model, group, **kwargs)
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return None


def compare_many(group, cases):
    """:func:`compare` for several ``(family, seed, num_experts, method)`` cases in one launch (saves spawns)."""
    return [compare(group, *case) for case in cases]

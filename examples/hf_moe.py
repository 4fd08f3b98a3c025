"""A Hugging Face transformers MoE model on DWDP, checked against the unmodified HF model.

Every rank builds the same model (a tiny random config of a family, or a local checkpoint
directory), runs the unmodified HF model, then converts it with
:func:`dwdp_comm.integrations.transformers.convert` and runs the same inputs: logits and greedy
``generate`` tokens must match ("check passed (tolerance ...)"; exit status 1 otherwise). It prints
tokens/s of both, expert memory per rank before/after, and the exposed prefetch time.

Examples::

    python examples/hf_moe.py --model mixtral --world-size 3                 # CPU, sim backend
    python examples/hf_moe.py --model gpt_oss --world-size 2 --backend cuda_ipc   # GPUs
    python examples/hf_moe.py --model /path/to/local/checkpoint --world-size 2 --backend cuda_ipc

On GPUs rank r uses device ``r % device_count``: with more ranks than GPUs several ranks share one
GPU (a functional check only, the output says so). No hub access: ``--model`` is a family name
(``mixtral``, ``qwen3_moe``, ``deepseek_v3``, ``gpt_oss``, ``olmoe``, ``qwen2_moe``) or a local path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import dwdp_comm as dc

FAMILIES = ("mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "olmoe", "qwen2_moe")
TINY = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64)


def tiny_config(family: str, num_experts: int, layers: int):
    import transformers as tf
    base = dict(TINY, num_hidden_layers=layers)
    if family == "mixtral":
        return tf.MixtralConfig(**base, intermediate_size=16, num_local_experts=num_experts, num_experts_per_tok=2)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**base, intermediate_size=24, moe_intermediate_size=16, num_experts=num_experts,
                                 num_experts_per_tok=2, head_dim=8, decoder_sparse_step=1, mlp_only_layers=[])
    if family == "deepseek_v3":
        return tf.DeepseekV3Config(**base, intermediate_size=24, moe_intermediate_size=16, n_routed_experts=num_experts,
                                   num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=0,
                                   n_shared_experts=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4,
                                   qk_nope_head_dim=4, v_head_dim=8)
    if family == "gpt_oss":
        return tf.GptOssConfig(**base, intermediate_size=16, num_local_experts=num_experts, num_experts_per_tok=2,
                               head_dim=8, sliding_window=16,
                               layer_types=["sliding_attention", "full_attention"] * (layers // 2) +
                               ["sliding_attention"] * (layers % 2))
    if family == "olmoe":
        return tf.OlmoeConfig(**base, intermediate_size=16, num_experts=num_experts, num_experts_per_tok=2)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(**base, intermediate_size=24, moe_intermediate_size=16, num_experts=num_experts,
                                 num_experts_per_tok=2, shared_expert_intermediate_size=16, decoder_sparse_step=1,
                                 mlp_only_layers=[])
    raise ValueError(f"--model: {family!r} is neither a local checkpoint directory nor one of {FAMILIES}")


def build(args, device):
    import transformers as tf
    dtype = getattr(torch, args.dtype)
    if os.path.isdir(args.model):
        return tf.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    torch.manual_seed(args.seed)
    return tf.AutoModelForCausalLM.from_config(tiny_config(args.model, args.experts, args.layers),
                                               dtype=dtype).to(device).eval()


def _run(model, ids, new_tokens, device):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    with torch.no_grad():
        logits = model(ids).logits
        sync()
        t0 = time.perf_counter()
        tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False)
        sync()
        dt = time.perf_counter() - t0
    return logits, tokens, ids.shape[0] * new_tokens / dt


def rank_main(group, args):
    from dwdp_comm.integrations.transformers import convert
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // group.size))
    dev = group.device
    ref = build(args, dev)
    gen = torch.Generator().manual_seed(args.seed + 1 + group.rank)  # each rank its own requests
    ids = torch.randint(0, ref.config.vocab_size, (args.batch, args.prompt), generator=gen).to(dev)
    want_logits, want_tokens, hf_tps = _run(ref, ids, args.new_tokens, dev)
    del ref
    model = build(args, dev)
    with convert(model, group, depth=args.depth) as dm:
        dm.pipeline.exposed_seconds(reset=True)
        got_logits, got_tokens, dwdp_tps = _run(model, ids, args.new_tokens, dev)
        exposed = dm.pipeline.exposed_seconds()
        stats = dm.stats()
        diff = float((got_logits.float() - want_logits.float()).abs().max())
        return {"rank": group.rank, "backend": group.backend, "device": str(dev),
                "methods": sorted({s.method for s in dm.sites}), "logits_max_diff": diff,
                "tokens_equal": bool(torch.equal(got_tokens, want_tokens)), "hf_tokens_per_s": hf_tps,
                "dwdp_tokens_per_s": dwdp_tps, "exposed_prefetch_s": exposed, "memory": dm.memory,
                "bytes_pulled": sum(s["bytes_pulled"] for s in stats.values())}


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mixtral", help=f"a family ({', '.join(FAMILIES)}) or a local checkpoint dir")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--backend", default="sim", help="sim (CPU), cuda_ipc, auto, ...")
    p.add_argument("--experts", type=int, default=5, help="routed experts of a tiny config")
    p.add_argument("--layers", type=int, default=2, help="decoder layers of a tiny config")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--prompt", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=None, help="max |logits diff| (default: 1e-4 fp32, 5e-2 else)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    tol = args.tolerance if args.tolerance is not None else (1e-4 if args.dtype == "float32" else 5e-2)
    res = dc.testing.launch(rank_main, args.world_size, args, backend=args.backend, timeout=600)
    if args.backend != "sim" and torch.cuda.is_available() and args.world_size > torch.cuda.device_count():
        print(f"note: {args.world_size} ranks share {torch.cuda.device_count()} GPU(s): a functional check, "
              "speed and memory are not representative")
    for r in res:
        m = r["memory"]
        print(f"rank {r['rank']} [{r['backend']} {r['device']}] experts via {','.join(r['methods'])}: "
              f"HF {r['hf_tokens_per_s']:.1f} tok/s, DWDP {r['dwdp_tokens_per_s']:.1f} tok/s; expert memory "
              f"{_fmt_bytes(m['experts_bytes_before'])} -> {_fmt_bytes(m['experts_bytes_after'])} "
              f"(local {_fmt_bytes(m['local_bytes'])} + slots {_fmt_bytes(m['slot_bytes'])}); "
              f"pulled {_fmt_bytes(r['bytes_pulled'])}, exposed prefetch {r['exposed_prefetch_s'] * 1e3:.2f} ms; "
              f"max |logits diff| {r['logits_max_diff']:.2e}, greedy tokens {'equal' if r['tokens_equal'] else 'DIFFER'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "tolerance": tol, "per_rank": res}, f, indent=1)
    ok = all(r["logits_max_diff"] <= tol and r["tokens_equal"] for r in res)
    print(f"check {'passed' if ok else 'FAILED'} (tolerance {tol:g} on logits, greedy tokens equal)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

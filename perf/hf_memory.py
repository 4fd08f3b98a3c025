"""Memory per rank of real-size HF MoE models on DWDP: expert bytes before, local + slots after, GPU memory.

Builds Qwen3-30B-A3B, DeepSeek-V3 and Mixtral-8x7B configs with fewer layers (``--layers``, all of
them MoE layers) and runs, on ``--world-size`` ranks, either path:

* ``convert``: the model with uninitialised weights on the device (``to_empty``; memory, not values,
  is measured), then :func:`~dwdp_comm.integrations.transformers.convert`;
* ``load``: a checkpoint of that reduced model written first (uninitialised values,
  ``save_pretrained``), then :func:`~dwdp_comm.integrations.hf_loading.load_model`, which never
  holds a remote expert row (skipped when the checkpoint would exceed ``--max-checkpoint-gib``).

Per rank it records the expert bytes before (what HF holds), local + slot bytes after, the
symmetric heap's size, and on GPUs ``torch.cuda.memory_allocated`` before / after / peak (the heap
and slots are VMM allocations outside torch's allocator, so they are reported apart). The
reduced-model figures are measured; the full-model ones are extrapolated from exact byte counts of
the full config built on the meta device (non-expert bytes, expert bytes) and the measured
per-layer local/heap bytes. JSON with machine, date and commit.

Usage::

    python3 -m perf.hf_memory --world-size 2                    # GPU: cuda_ipc (ranks may share one GPU)
    python3 -m perf.hf_memory --smoke --json /tmp/m.json        # CPU: sim backend, tiny sizes
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile

import torch

import dwdp_comm as dc
from dwdp_comm.bench import memory, record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODELS = ("qwen3_30b_a3b", "deepseek_v3", "mixtral_8x7b")
GIB = 1 << 30


def fmt(n: float | None) -> str:
    """Bytes in the largest unit that keeps them >= 1 (GiB, MiB, KiB, B)."""
    if n is None:
        return "-"
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def make_config(name: str, layers: int | None, smoke: bool):
    """The model's real config (``layers=None``: all its layers) or a reduced one (``layers`` MoE layers)."""
    import transformers as tf
    if name == "qwen3_30b_a3b":
        kw = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                  num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                  num_experts_per_tok=8, max_position_embeddings=40960, decoder_sparse_step=1, mlp_only_layers=[],
                  tie_word_embeddings=False)
        small = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
                     num_hidden_layers=6)
        cls, dense = tf.Qwen3MoeConfig, {}
    elif name == "deepseek_v3":
        kw = {}  # transformers' DeepseekV3Config defaults are DeepSeek-V3's (61 layers, 3 dense, 256 experts)
        small = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                     num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                     n_group=1, topk_group=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                     qk_nope_head_dim=8, v_head_dim=16, num_hidden_layers=6, first_k_dense_replace=1)
        cls, dense = tf.DeepseekV3Config, {"first_k_dense_replace": 0}
    elif name == "mixtral_8x7b":
        kw = {}  # transformers' MixtralConfig defaults are Mixtral-8x7B's
        small = dict(vocab_size=256, hidden_size=64, intermediate_size=32, num_attention_heads=4,
                     num_key_value_heads=2, num_local_experts=8, num_hidden_layers=6)
        cls, dense = tf.MixtralConfig, {}
    else:
        raise SystemExit(f"--model: {name!r} is not one of {MODELS}")
    if smoke:
        kw = dict(kw, **small)
    if layers is not None:
        kw = dict(kw, num_hidden_layers=layers, **dense)
    return cls(**kw)


def byte_counts(config, dtype) -> dict:
    """Exact bytes of a config's model, built on the meta device: experts, everything else, MoE layers."""
    import transformers as tf
    from dwdp_comm.integrations.transformers import find_experts
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    sites = find_experts(model)
    experts = {id(getattr(s.module, n)) for s in sites for n in s.names}
    nb = lambda t: t.numel() * t.element_size()  # noqa: E731
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}  # tied ones once
    return {"experts_bytes": sum(nb(t) for i, t in tensors.items() if i in experts),
            "other_bytes": sum(nb(t) for i, t in tensors.items() if i not in experts),
            "moe_layers": len(sites), "num_experts": sites[0].num_experts if sites else 0}


def write_checkpoint(config, dtype, directory: str) -> str:
    """save_pretrained of the reduced model with uninitialised weights (only sizes matter here)."""
    import transformers as tf
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to_empty(device="cpu")
    model.save_pretrained(directory, max_shard_size="4GB")
    return directory


def rank_main(group, jobs):
    """Per job ``(model, path, config, dtype, depth, checkpoint)``: this rank's memory figures."""
    import transformers as tf
    from dwdp_comm.integrations.hf_loading import load_model
    from dwdp_comm.integrations.transformers import convert
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // group.size))
    dev = group.device
    cuda = dev.type == "cuda"

    def alloc():
        return memory.torch_allocated(dev)

    out, model = [], None
    for name, path, config, dtype, depth, ckpt in jobs:
        if cuda:
            torch.cuda.empty_cache()
        base = alloc()
        before = None
        if path == "convert":
            with torch.device("meta"):
                model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
            model.to_empty(device=dev)  # uninitialised: the memory of HF's model, without the init time
            before = alloc()
            if cuda:
                torch.cuda.reset_peak_memory_stats(dev)
            dm = convert(model, group, depth=depth)
        else:
            if cuda:
                torch.cuda.reset_peak_memory_stats(dev)
            dm = load_model(ckpt, group, dtype=dtype, depth=depth)
        after = alloc()
        peak = torch.cuda.max_memory_allocated(dev) if cuda else None
        rec = {"model": name, "path": path, "rank": group.rank, "backend": group.backend, "device": str(dev),
               "local_experts": len(dm.store.layout.local_experts), "heap_bytes": dm.store.heap_nbytes,
               **dm.memory,
               "torch_allocated_base": base, "torch_allocated_before": before, "torch_allocated_after": after,
               "torch_allocated_peak": peak}
        if dm.loading:
            rec["expert_bytes_read"] = dm.loading["expert_bytes_read"]
            rec["other_bytes_read"] = dm.loading["other_bytes_read"]
        dm.close()
        dm = model = None  # the next job's base must not include this model
        gc.collect()
        out.append(rec)
    return out


def extrapolate(rec: dict, reduced: dict, full: dict) -> dict:
    """Full-model figures per rank: exact full byte counts + the measured per-MoE-layer local/heap bytes."""
    per_layer = full["moe_layers"] / reduced["moe_layers"]
    local = rec["local_bytes"] * per_layer
    heap = rec["heap_bytes"] * per_layer
    return {"moe_layers": full["moe_layers"],
            "hf_bytes": full["other_bytes"] + full["experts_bytes"],  # every rank holds every expert
            "experts_bytes_before": full["experts_bytes"],
            "local_bytes": int(local), "heap_bytes": int(heap), "slot_bytes": rec["slot_bytes"],
            "dwdp_bytes": int(full["other_bytes"] + heap + rec["slot_bytes"]),
            "experts_bytes_after": int(local + rec["slot_bytes"])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="all", help=f"one of {MODELS} or 'all'")
    p.add_argument("--layers", type=int, default=2, help="MoE layers of the reduced model")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--backend", default=None, help="default: cuda_ipc with a GPU, sim without")
    p.add_argument("--path", default="both", choices=("convert", "load", "both"))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--max-checkpoint-gib", type=float, default=8.0,
                   help="skip the load path where the reduced checkpoint would be larger")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU)")
    p.add_argument("--json", default=None, help="default perf/results/hf_memory_<backend>.json")
    args = p.parse_args(argv)
    backend = args.backend or ("cuda_ipc" if torch.cuda.is_available() and not args.smoke else "sim")
    dtype = getattr(torch, args.dtype)
    names = MODELS if args.model == "all" else (args.model,)
    tmp = tempfile.mkdtemp(prefix="hf_memory_")
    jobs, counts, skipped = [], {}, []
    for name in names:
        reduced_cfg = make_config(name, args.layers, args.smoke)
        counts[name] = {"reduced": byte_counts(reduced_cfg, dtype),
                        "full": byte_counts(make_config(name, None, args.smoke), dtype)}
        for path in (("convert", "load") if args.path == "both" else (args.path,)):
            ckpt = None
            if path == "load":
                size = sum(counts[name]["reduced"][k] for k in ("experts_bytes", "other_bytes"))
                if size > args.max_checkpoint_gib * GIB:
                    skipped.append({"model": name, "path": "load", "why": f"checkpoint {size / GIB:.1f} GiB > "
                                    f"--max-checkpoint-gib {args.max_checkpoint_gib}"})
                    continue
                ckpt = write_checkpoint(reduced_cfg, dtype, os.path.join(tmp, name))
            jobs.append((name, path, reduced_cfg, dtype, args.depth, ckpt))
    res = dc.testing.launch(rank_main, args.world_size, jobs, backend=backend, timeout=590)
    shared = backend != "sim" and torch.cuda.is_available() and args.world_size > torch.cuda.device_count()
    rows = []
    for j in range(len(jobs)):
        for per in res:
            rec = per[j]
            rec["full"] = extrapolate(rec, counts[rec["model"]]["reduced"], counts[rec["model"]]["full"])
            rows.append(rec)
            f = rec["full"]
            gpu = ""
            if rec["torch_allocated_after"] is not None:
                gpu = (f"; torch allocated before {fmt(rec['torch_allocated_before'])} after "
                       f"{fmt(rec['torch_allocated_after'])} peak {fmt(rec['torch_allocated_peak'])}")
            print(f"{rec['model']:14s} {rec['path']:7s} rank {rec['rank']}: experts {fmt(rec['experts_bytes_before'])}"
                  f" -> {fmt(rec['experts_bytes_after'])} ({args.layers} layers; local {fmt(rec['local_bytes'])} + "
                  f"slots {fmt(rec['slot_bytes'])}); full model ({f['moe_layers']} MoE layers) per rank: HF "
                  f"{fmt(f['hf_bytes'])} -> DWDP {fmt(f['dwdp_bytes'])}{gpu}")
    for s in skipped:
        print(f"{s['model']:14s} load    skipped: {s['why']}")
    if shared:
        print(f"note: {args.world_size} ranks share {torch.cuda.device_count()} GPU(s): per-process torch figures "
              "are per rank; the GPU's total is shared")
    doc = {"schema": "dwdp/hf_memory/v1", "date": record.utc_date(),
           "commit": record.commit() or "unknown", "machine": record.machine_lines(), "backend": backend, "world_size": args.world_size,
           "ranks_share_gpus": shared, "args": {k: v for k, v in vars(args).items()}, "byte_counts": counts,
           "skipped": skipped, "rows": rows,
           "notes": ["reduced model: --layers MoE layers (DeepSeek-V3 without its dense layers); full figures "
                     "extrapolated per rank: exact byte counts of the full config on the meta device + the measured "
                     "local/heap bytes per MoE layer + the measured slots",
                     "heap and slots are VMM allocations (cuda_ipc), outside torch.cuda.memory_allocated"]}
    out = args.json or os.path.join(ROOT, "perf", "results", f"hf_memory_{backend}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(doc, fh, indent=1, default=str)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

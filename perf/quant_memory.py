"""Memory per rank of a DeepSeek-V3-shaped block-FP8 checkpoint on DWDP: local experts + scales + slots vs replicated.

Writes a checkpoint with DeepSeek-V3's real dimensions (E=256, H=7168, I=2048, MLA attention, vocab
129280) and ``--layers`` MoE layers (default 2, no dense layer), in the layout of the real release:
every expert and every decoder ``nn.Linear`` ``float8_e4m3fn`` with a float32 ``weight_scale_inv``
of 128x128 blocks, embeddings / norms / router / ``lm_head`` in bf16; random FP8 bytes (no NaN
codes), scales 1.0. It is streamed to disk (about 11.3 GB a layer), then loaded with
:func:`~dwdp_comm.integrations.hf_loading.load_model` on ``--world-size`` ranks: each rank reads
its own expert rows and their scales, keeps them FP8 in the symmetric heap, and holds ``--depth``
prefetch slots; the FP8 attention and shared experts are dequantized to bf16 (replicated).

Per rank: expert bytes read, local experts + scales (heap), slots, the model's other tensors, and
the replicated figure (every expert FP8 + the same other tensors); on GPUs (``cuda_ipc``; two ranks
may share one GPU) ``torch.cuda.memory_allocated`` before / after / peak (the heap and slots are
VMM allocations outside torch's allocator, reported apart) and the device's used memory. The
full model (58 MoE + 3 dense layers) is extrapolated from exact byte counts of its config on the
meta device and the measured per-layer figures, with the cost of dequantizing the non-expert FP8
weights (bf16) next to keeping them FP8. JSON with machine, date and commit.

Usage::

    PYTHONPATH=. python3 perf/quant_memory.py --world-size 2   # GPU: cuda_ipc, a 25 GiB checkpoint on disk
    PYTHONPATH=. python3 perf/quant_memory.py --smoke --json /tmp/q.json   # CPU: sim backend, tiny dimensions
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
import time

import numpy as np
import torch

import dwdp_comm as dc
from dwdp_comm.bench import memory, record

GIB = 1 << 30
BLOCK = (128, 128)
_ST_DTYPES = {torch.float8_e4m3fn: "F8_E4M3", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def fmt(n: float | None) -> str:
    """Bytes in the largest unit that keeps them >= 1 (GiB, MiB, KiB, B)."""
    if n is None:
        return "-"
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def make_config(layers: int | None, smoke: bool):
    """DeepSeek-V3's config (transformers' defaults are its dimensions) with ``layers`` MoE layers and no
    dense layer, or all 61 layers (``layers=None``); ``smoke``: tiny dimensions, multiples of 128."""
    import transformers as tf
    kw = {}
    if smoke:
        kw = dict(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                  num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16, num_experts_per_tok=2,
                  n_group=1, topk_group=1, q_lora_rank=128, kv_lora_rank=128, qk_rope_head_dim=32,
                  qk_nope_head_dim=96, v_head_dim=128, num_hidden_layers=6, first_k_dense_replace=1)
    if layers is not None:
        kw.update(num_hidden_layers=layers, first_k_dense_replace=0)
    return tf.DeepseekV3Config(**kw)


def _meta_model(config):
    import transformers as tf
    with torch.device("meta"):
        return tf.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def _quantized_linear(name: str) -> bool:
    """The decoder's nn.Linear weights the release stores in FP8 (not lm_head, not the router)."""
    return name.startswith("model.layers.") and not re.search(r"\.gate\.weight$", name)


def _scale_shape(shape) -> tuple:
    return (math.ceil(shape[0] / BLOCK[0]), math.ceil(shape[1] / BLOCK[1]))


def checkpoint_entries(config) -> list[tuple[str, str, tuple]]:
    """``(key, safetensors dtype, shape)`` of every tensor of the FP8 checkpoint of ``config``, in the release's
    names (experts per expert: ``...experts.{e}.{gate,up,down}_proj.weight`` + ``weight_scale_inv``)."""
    from dwdp_comm.integrations.transformers import find_experts
    model = _meta_model(config)
    sites = find_experts(model)
    experts = {f"{s.path}.{n}" for s in sites for n in s.names}
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    out = []
    for key, t in model.state_dict().items():
        if key in experts:
            continue
        if key in linears and _quantized_linear(key):
            out += [(key, "F8_E4M3", tuple(t.shape)), (key + "_scale_inv", "F32", _scale_shape(t.shape))]
        else:
            out.append((key, _ST_DTYPES[t.dtype], tuple(t.shape)))
    H, inter = config.hidden_size, config.moe_intermediate_size
    for s in sites:
        for e in range(s.num_experts):
            for proj, shape in (("gate_proj", (inter, H)), ("up_proj", (inter, H)), ("down_proj", (H, inter))):
                key = f"{s.path}.{e}.{proj}.weight"
                out += [(key, "F8_E4M3", shape), (key + "_scale_inv", "F32", _scale_shape(shape))]
    return out


class _Pools:
    """Bytes to fill tensors with, cycled: FP8 codes without NaN, float32 1.0, small bf16 normals."""

    def __init__(self, nbytes: int = 64 << 20):
        g = np.random.default_rng(0)
        fp8 = g.integers(0, 256, nbytes, dtype=np.uint8)
        fp8[(fp8 & 0x7F) == 0x7F] = 0  # 0x7F / 0xFF are NaN in float8_e4m3fn
        self.pools = {"F8_E4M3": fp8, "F32": np.ones(nbytes // 4, dtype=np.float32).view(np.uint8),
                      "BF16": (torch.randn(nbytes // 2) * 0.02).to(torch.bfloat16).view(torch.uint8).numpy()}

    def write(self, f, dtype: str, nbytes: int) -> None:
        pool = self.pools.get(dtype, self.pools["F32"])
        while nbytes > 0:
            n = min(nbytes, pool.size)
            f.write(memoryview(pool[:n]))
            nbytes -= n


def _write_safetensors(path: str, entries, pools: _Pools) -> int:
    """One safetensors file of ``entries``, streamed (header, then each tensor's bytes); its size."""
    size = {"F8_E4M3": 1, "F32": 4, "BF16": 2, "F16": 2}
    header, off = {}, 0
    for key, dt, shape in entries:
        n = math.prod(shape) * size[dt]
        header[key] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, dt, shape in entries:
            pools.write(f, dt, header[key]["data_offsets"][1] - header[key]["data_offsets"][0])
    return 8 + len(raw) + off


def write_checkpoint(config, directory: str) -> dict:
    """The FP8 checkpoint of ``config`` in ``directory``: one file per layer plus one for the rest, an index."""
    os.makedirs(directory, exist_ok=True)
    entries = checkpoint_entries(config)
    files: dict[str, list] = {}
    for e in entries:
        m = re.match(r"model\.layers\.(\d+)\.", e[0])
        files.setdefault(f"model-layer{int(m.group(1)):03d}.safetensors" if m else "model-rest.safetensors",
                         []).append(e)
    pools, total, t0 = _Pools(), 0, time.perf_counter()
    for name, ents in sorted(files.items()):
        total += _write_safetensors(os.path.join(directory, name), ents, pools)
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": {k: n for n, ents in files.items()
                                                                      for k, _, _ in ents}}, f)
    cfg = config.to_dict()
    cfg.update(dtype="bfloat16", quantization_config={"quant_method": "fp8", "fmt": "e4m3",
                                                      "activation_scheme": "dynamic", "weight_block_size": list(BLOCK)})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f)
    return {"bytes": total, "tensors": len(entries), "write_s": time.perf_counter() - t0}


def byte_counts(config) -> dict:
    """Exact bytes of ``config``'s model: experts as FP8 + scales; other tensors in bf16 (dequantized, as
    load_model holds them) and as the release stores them (FP8 linears + scales)."""
    from dwdp_comm.integrations.transformers import find_experts
    model = _meta_model(config)
    sites = find_experts(model)
    experts = {f"{s.path}.{n}" for s in sites for n in s.names}
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    H, inter = config.hidden_size, config.moe_intermediate_size
    per_expert = sum(n * k + 4 * math.prod(_scale_shape((n, k))) for n, k in ((2 * inter, H), (H, inter)))
    other, other_fp8 = 0, 0
    for key, t in model.state_dict().items():
        if key in experts:
            continue
        nb = t.numel() * t.element_size()
        other += nb
        other_fp8 += t.numel() + 4 * math.prod(_scale_shape(t.shape)) if key in linears and \
            _quantized_linear(key) else nb
    return {"experts_bytes": per_expert * sum(s.num_experts for s in sites), "per_expert_bytes": per_expert,
            "other_bytes": other, "other_bytes_fp8": other_fp8, "moe_layers": len(sites),
            "num_experts": sites[0].num_experts if sites else 0}


def rank_main(group, checkpoint: str, depth: int, forward_tokens: int):
    """Load the checkpoint on this rank; its memory figures (and one forward's peak with ``forward_tokens``)."""
    from dwdp_comm.integrations.hf_loading import load_model
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // group.size))
    dev = group.device
    cuda = dev.type == "cuda"

    def alloc():
        return memory.torch_allocated(dev)

    def used():
        return memory.device_used(dev)

    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    base, used_base = alloc(), used()
    t0 = time.perf_counter()
    dm = load_model(checkpoint, group, dtype=torch.bfloat16, depth=depth)
    load_s = time.perf_counter() - t0
    params = {id(p): p for p in list(dm.model.parameters()) + list(dm.model.buffers()) if p.device.type != "meta"}
    rec = {"rank": group.rank, "backend": group.backend, "device": str(dev), "load_s": load_s,
           "local_experts": len(dm.store.layout.local_experts), "heap_bytes": dm.store.heap_nbytes,
           "other_bytes": sum(p.numel() * p.element_size() for p in params.values()), **dm.memory,
           "expert_bytes_read": dm.loading["expert_bytes_read"], "other_bytes_read": dm.loading["other_bytes_read"],
           "dequantized_tensors": len(dm.loading["dequantized"]), "weight_format": dm.loading["weight_format"],
           "torch_allocated_base": base, "torch_allocated_after": alloc(),
           "torch_allocated_peak": torch.cuda.max_memory_allocated(dev) if cuda else None,
           "device_used_base": used_base, "device_used_after": used()}
    if forward_tokens:
        ids = torch.randint(0, dm.model.config.vocab_size, (1, forward_tokens),
                            generator=torch.Generator().manual_seed(group.rank)).to(dev)
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        with torch.no_grad():
            logits = dm.model(ids, use_cache=False).logits
        rec["forward_tokens"] = forward_tokens
        rec["forward_finite"] = bool(torch.isfinite(logits.float()).all())
        rec["torch_allocated_forward_peak"] = torch.cuda.max_memory_allocated(dev) if cuda else None
    dm.close()
    gc.collect()
    return rec


def extrapolate(rec: dict, reduced: dict, full: dict) -> dict:
    """Full-model figures per rank: exact byte counts of the full config + the measured heap per MoE layer."""
    heap = rec["heap_bytes"] * full["moe_layers"] / reduced["moe_layers"]
    local = rec["local_bytes"] * full["moe_layers"] / reduced["moe_layers"]
    return {"moe_layers": full["moe_layers"], "experts_bytes": full["experts_bytes"],
            "replicated_bytes": full["experts_bytes"] + full["other_bytes"],
            "replicated_bytes_fp8_other": full["experts_bytes"] + full["other_bytes_fp8"],
            "local_bytes": int(local), "heap_bytes": int(heap), "slot_bytes": rec["slot_bytes"],
            "dwdp_bytes": int(full["other_bytes"] + heap + rec["slot_bytes"]),
            "dwdp_bytes_fp8_other": int(full["other_bytes_fp8"] + heap + rec["slot_bytes"]),
            "dequantize_cost_bytes": full["other_bytes"] - full["other_bytes_fp8"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=2, help="MoE layers of the checkpoint (DeepSeek-V3 dimensions)")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--backend", default=None, help="default: cuda_ipc with a GPU, sim without")
    p.add_argument("--depth", type=int, default=2, help="prefetch slots")
    p.add_argument("--forward", type=int, default=0, metavar="TOKENS",
                   help="also run one forward of TOKENS tokens per rank (its peak; needs the quantized experts path)")
    p.add_argument("--dir", default=None,
                   help="where to write the checkpoint (default: a temporary directory, removed)")
    p.add_argument("--smoke", action="store_true", help="tiny dimensions (CPU)")
    p.add_argument("--json", default=None, help="default perf/results/quant_memory_<backend>.json")
    args = p.parse_args(argv)
    backend = args.backend or ("cuda_ipc" if torch.cuda.is_available() and not args.smoke else "sim")
    reduced_cfg = make_config(args.layers, args.smoke)
    counts = {"reduced": byte_counts(reduced_cfg), "full": byte_counts(make_config(None, args.smoke))}
    directory = args.dir or tempfile.mkdtemp(prefix="quant_memory_")
    try:
        written = write_checkpoint(reduced_cfg, directory)
        print(f"wrote {fmt(written['bytes'])} ({written['tensors']} tensors) to {directory} in "
              f"{written['write_s']:.1f} s")
        res = dc.testing.launch(rank_main, args.world_size, directory, args.depth, args.forward, backend=backend,
                                timeout=590)
    finally:
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)
    shared = backend != "sim" and torch.cuda.is_available() and args.world_size > torch.cuda.device_count()
    red = counts["reduced"]
    for rec in res:
        rec["replicated_bytes"] = red["experts_bytes"] + rec["other_bytes"]
        rec["dwdp_bytes"] = rec["other_bytes"] + rec["heap_bytes"] + rec["slot_bytes"]
        rec["full"] = extrapolate(rec, red, counts["full"])
        gpu = ""
        if rec["torch_allocated_after"] is not None:
            gpu = (f"; torch allocated {fmt(rec['torch_allocated_after'])} (peak {fmt(rec['torch_allocated_peak'])}),"
                   f" device used {fmt(rec['device_used_after'])}")
        f = rec["full"]
        print(f"rank {rec['rank']} [{rec['backend']} {rec['device']}]: read {fmt(rec['expert_bytes_read'])} of "
              f"{fmt(red['experts_bytes'])} FP8 experts; holds local {fmt(rec['local_bytes'])} (heap "
              f"{fmt(rec['heap_bytes'])}) + slots {fmt(rec['slot_bytes'])} + other {fmt(rec['other_bytes'])} = "
              f"{fmt(rec['dwdp_bytes'])} vs replicated {fmt(rec['replicated_bytes'])} ({args.layers} layers)"
              f"{gpu}; full model ({f['moe_layers']} MoE layers): {fmt(f['dwdp_bytes'])} vs replicated "
              f"{fmt(f['replicated_bytes'])} (non-expert FP8 dequantized: +{fmt(f['dequantize_cost_bytes'])})")
    if shared:
        print(f"note: {args.world_size} ranks share {torch.cuda.device_count()} GPU(s): torch figures are per rank, "
              "the device's used memory is the GPU's total")
    doc = {"schema": "dwdp/quant_memory/v1", "date": record.utc_date(), "commit": record.commit() or "unknown",
           "machine": record.machine_lines(), "backend": backend, "world_size": args.world_size,
           "ranks_share_gpus": shared, "args": vars(args), "checkpoint": written, "byte_counts": counts,
           "rows": res,
           "notes": ["DeepSeek-V3 dimensions, --layers MoE layers, no dense layer; experts and decoder linears FP8 "
                     "with float32 128x128 block scales, random bytes",
                     "other_bytes: the model's tensors besides the experts, non-expert FP8 dequantized to bf16 at load",
                     "heap and slots are VMM allocations on cuda_ipc, outside torch.cuda.memory_allocated",
                     "full: exact byte counts of the 61-layer config (58 MoE + 3 dense layers) on the meta device + "
                     "the measured heap per MoE layer + the measured slots"]}
    out = args.json or os.path.join(record.REPO_ROOT, "perf", "results", f"quant_memory_{backend}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(doc, fh, indent=1, default=str)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

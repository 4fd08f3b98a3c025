"""DeepSeek-V3 decoder layers with DWDP against DEP (or a single GPU), with a built-in reference check.

Each rank prefills its own stream of requests (prompt lengths with a chosen mean and coefficient of
variation, drawn per rank, so ranks are unbalanced as in real serving) through ``--layers`` DeepSeek-V3
decoder layers (MLA attention + MoE with 256 routed experts, top-8 of 8 groups choosing 4, one
shared expert) with random weights:

* ``dwdp``: attention data-parallel, routed experts sharded in the symmetric heap and prefetched one
  layer ahead by the copy engine; no collective in the forward.
* ``dep``: attention data-parallel, experts expert-parallel, all-to-all dispatch and combine.
* ``single``: one rank holding every expert (no communication).

It prints per-rank iteration latency, tokens/s/GPU, exposed prefetch time, prefetch volume, peak
memory; ``--json`` writes them. It then checks its own output of the first batch against a
single-device reference of the same weights (all experts rebuilt from the seed, reference kernels)
and exits with status 1 if the relative error exceeds ``--tolerance`` (2e-2). The check is per MoE
layer, on the very input the layer saw: through several layers, a rounding difference can flip a
token's top-k choice in a later layer, which says nothing about the weights being right (the
end-to-end error is reported too, for information).

Examples::

    python examples/deepseek_layer.py --size toy --world-size 3               # CPU, sim backend
    python examples/deepseek_layer.py --mode dwdp --world-size 4 --prompt-mean 16384 --cv 0.2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone

import torch
import torch.distributed as dist

import dwdp_comm as dc
from dwdp_comm import moe


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("dwdp", "dep", "single"), default="dwdp")
    ap.add_argument("--layers", type=int, default=4, help="MoE decoder layers (default 4)")
    ap.add_argument("--weights", choices=("bf16", "fp8"), default="bf16", help="routed-expert weight format")
    ap.add_argument("--size", choices=("full", "toy"), default=None,
                    help="model size (default: full on GPUs, toy on CPU)")
    ap.add_argument("--world-size", type=int, default=None, help="ranks to launch (default: GPUs, or 2 on CPU)")
    ap.add_argument("--backend", default="auto", help="dwdp_comm backend for --mode dwdp")
    ap.add_argument("--prompt-mean", type=int, default=None, help="mean prompt length (default 8192; toy: 24)")
    ap.add_argument("--cv", type=float, default=0.2, help="coefficient of variation of prompt lengths")
    ap.add_argument("--max-num-tokens", type=int, default=None,
                    help="tokens per iteration per rank (default: 2 x prompt mean)")
    ap.add_argument("--iters", type=int, default=4, help="timed iterations")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--depth", type=int, default=2, help="DWDP prefetch slots")
    ap.add_argument("--schedule", default="round_robin")
    ap.add_argument("--chunk-mib", type=float, default=8.0)
    ap.add_argument("--kernel-backend", default="auto")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--tolerance", type=float, default=2e-2)
    ap.add_argument("--no-check", action="store_true", help="skip the reference check")
    ap.add_argument("--json", help="write results to this file")
    return ap.parse_args(argv)


def prompt_lengths(rank: int, seed: int, mean: int, cv: float, count: int, cap: int) -> list[int]:
    """``count`` prompt lengths for ``rank``: lognormal with the given mean and CV, in [1, cap]."""
    g = torch.Generator().manual_seed(seed * 7919 + rank)
    if cv <= 0:
        return [min(mean, cap)] * count
    sigma = math.sqrt(math.log1p(cv * cv))
    mu = math.log(mean) - sigma * sigma / 2
    vals = torch.exp(mu + sigma * torch.randn(count, generator=g))
    return [int(min(max(1, round(v)), cap)) for v in vals.tolist()]


def batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Greedy packing of requests (in order) into iterations of at most ``max_tokens`` tokens."""
    out, cur = [], []
    for n in lengths:
        if cur and sum(cur) + n > max_tokens:
            out.append(cur)
            cur = []
        cur.append(n)
    if cur:
        out.append(cur)
    return out


class Recorder(torch.nn.Module):
    """Wraps an MoE block; while ``active``, keeps its (input, output) for the reference check."""

    def __init__(self, block):
        super().__init__()
        self.block, self.active, self.seen = block, False, None

    def forward(self, x):
        y = self.block(x)
        if self.active:
            self.seen = (x, y)
        return y


class Model:
    """``layers`` decoder layers; the MoE blocks are DWDP, DEP or single-device."""

    def __init__(self, cfg, attn, moes, norms):
        self.cfg, self.attn, self.moes, self.norms = cfg, attn, moes, norms

    def __call__(self, x, seq_lens):
        for att, block, (n1, n2) in zip(self.attn, self.moes, self.norms):
            x = x + att(moe.rms_norm(x, n1, self.cfg.rms_eps), seq_lens)
            x = x + block(moe.rms_norm(x, n2, self.cfg.rms_eps))
        return x


class SingleMoE(torch.nn.Module):
    """All experts on this device, torch kernels: the single-GPU mode."""

    def __init__(self, cfg, router, shared, experts, fmt, kernel_backend):
        super().__init__()
        self.cfg, self.router, self.shared, self.experts, self.fmt, self.kb = cfg, router, shared, experts, fmt, kernel_backend

    def forward(self, x):
        from dwdp_comm.moe.layers import _route, _shared, kernel_args
        ids, wts = _route(self.cfg, x, self.router)
        xs, m, order = moe.permute_tokens(x, ids, self.cfg.num_experts)
        y = dc.kernels.moe_mlp(xs, m, backend=self.kb, **kernel_args(self.experts, self.fmt))
        return moe.unpermute_tokens(y, order, wts) + _shared(x, self.shared)


def device_used_bytes(device) -> int:
    """Bytes in use on the device (all allocators, VMM included), or torch's peak on CPU."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return total - free
    return 0


def rank_main(args_dict: dict):
    args = argparse.Namespace(**args_dict)
    rank, world = dist.get_rank(), dist.get_world_size()
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    cfg = moe.DEEPSEEK_V3 if args.size == "full" else moe.TOY
    dtype = torch.bfloat16
    layers = list(range(args.layers))
    lay = dc.ExpertLayout(cfg.num_experts, world, rank)
    mem0 = device_used_bytes(device)

    attn = [moe.MLAttention(cfg, moe.attention_weights(cfg, args.seed, l, device=device, dtype=dtype)) for l in layers]
    norms = [(a.w["attn_norm"], a.w["ffn_norm"]) for a in attn]
    routers = [moe.router_weights(cfg, args.seed, l, device=device) for l in layers]
    shared = [moe.shared_expert_weights(cfg, args.seed, l, device=device, dtype=dtype) for l in layers]
    group = store = pf = pipe = None
    if args.mode == "dwdp":
        group = dc.init(args.backend)
        store = dc.WeightStore(group, lay)
        for l in layers:
            for name, t in moe.expert_weights(cfg, args.seed, l, lay.local_experts, fmt=args.weights,
                                              device=device).items():
                store.register(l, name, t)
        store.commit()
        pf = dc.Prefetcher(store, depth=args.depth, schedule=args.schedule, chunk_nbytes=int(args.chunk_mib * 2**20))
        pipe = moe.DwdpPipeline(pf, layers)
        blocks = [moe.DwdpMoE(cfg, l, routers[l], shared[l], pipe, fmt=args.weights, kernel_backend=args.kernel_backend)
                  for l in layers]
    elif args.mode == "dep":
        pg = dist.new_group(backend="nccl") if on_gpu else None
        blocks = [moe.DepMoE(cfg, lay, routers[l], shared[l],
                             moe.expert_weights(cfg, args.seed, l, lay.local_experts, fmt=args.weights, device=device),
                             group=pg, fmt=args.weights, kernel_backend=args.kernel_backend) for l in layers]
    else:
        blocks = [SingleMoE(cfg, routers[l], shared[l],
                            moe.expert_weights(cfg, args.seed, l, range(cfg.num_experts), fmt=args.weights, device=device),
                            args.weights, args.kernel_backend) for l in layers]
    blocks = [Recorder(b) for b in blocks]
    model = Model(cfg, attn, blocks, norms)
    if on_gpu:
        torch.cuda.empty_cache()  # drop the generator's temporaries: count what the model holds
    mem_weights = device_used_bytes(device) - mem0

    n_batches = args.warmup + args.iters
    lengths = prompt_lengths(rank, args.seed, args.prompt_mean, args.cv, 64 * n_batches, args.max_num_tokens)
    plan = batches(lengths, args.max_num_tokens)[:n_batches]
    if len(plan) < n_batches:
        raise RuntimeError("not enough requests for the iterations asked")
    gen = torch.Generator(device=device).manual_seed(args.seed * 31 + rank)
    inputs = [torch.randn(sum(b), cfg.hidden, generator=gen, device=device, dtype=torch.float32).to(dtype)
              for b in plan]

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    if pipe:
        pipe.start()
    first_out, times = None, []
    dist.barrier()
    for i, (x, seq) in enumerate(zip(inputs, plan)):
        for b in blocks:
            b.active = i == 0
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            y = model(x, seq)
        sync()
        dt = time.perf_counter() - t0
        if i == 0:
            first_out = y
            seen = [b.seen for b in blocks]
            for b in blocks:
                b.active, b.seen = False, None
        if i >= args.warmup:
            times.append((dt, sum(seq)))
        if i == args.warmup - 1 and pipe:
            pipe.exposed_seconds(reset=True)
    exposed = pipe.exposed_seconds() if pipe else 0.0
    prefetched = pf.nbytes_prefetched if pf else 0
    peak = device_used_bytes(device) - mem0
    total_t = sum(t for t, _ in times)
    total_tok = sum(n for _, n in times)
    res = {"rank": rank, "iter_latency_ms": [round(t * 1e3, 3) for t, _ in times],
           "tokens": [n for _, n in times], "tokens_per_s": total_tok / total_t if total_t else 0.0,
           "exposed_prefetch_s": exposed, "exposed_fraction": exposed / total_t if total_t else 0.0,
           "prefetch_nbytes": prefetched, "weights_nbytes": mem_weights, "device_used_nbytes": peak,
           "backend": group.backend if group else None,
           "slot_nbytes": pf.slot_nbytes if pf else 0,
           "remote_nbytes_per_layer": store.remote_nbytes(layers[0]) if store else 0}
    if pipe:
        pipe.close()

    if not args.no_check:  # reference: all experts rebuilt from the seed, reference kernels, one layer at a time
        del blocks, model
        if pf:
            pf.close()
        rel = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm())
        x, per_layer = inputs[0], []
        with torch.no_grad():
            for l in layers:
                full = moe.expert_weights(cfg, args.seed, l, range(cfg.num_experts), fmt=args.weights, device=device)
                moe_in, moe_out = seen[l]
                per_layer.append(rel(moe_out, moe.reference_moe(cfg, moe_in, routers[l], shared[l], full,
                                                                fmt=args.weights)))
                x = x + attn[l](moe.rms_norm(x, norms[l][0], cfg.rms_eps), plan[0])
                x = x + moe.reference_moe(cfg, moe.rms_norm(x, norms[l][1], cfg.rms_eps), routers[l], shared[l],
                                          full, fmt=args.weights)
                del full
        res["rel_error_per_layer"] = per_layer
        res["rel_error"] = max(per_layer)
        res["rel_error_end_to_end"] = rel(first_out, x)
    if store:
        store.close()
    if group:
        group.close()
    return res


def summarize(args, results) -> dict:
    world = len(results)
    tps = [r["tokens_per_s"] for r in results]
    if args.mode == "dep":  # lock-step: the group's rate is bounded by the slowest rank's time
        per_gpu = sum(sum(r["tokens"]) for r in results) / max(sum(r["iter_latency_ms"]) / 1e3 for r in results) / world
    else:
        per_gpu = sum(tps) / world
    return {"tokens_per_s_per_gpu": per_gpu, "per_rank": results}


def main(argv=None) -> int:
    args = parse_args(argv)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    args.size = args.size or ("full" if gpus else "toy")
    args.world_size = args.world_size or (gpus or 2)
    if args.mode == "single":
        args.world_size = 1
    if args.prompt_mean is None:
        args.prompt_mean = 8192 if args.size == "full" else 24
    args.max_num_tokens = args.max_num_tokens or 2 * args.prompt_mean
    if args.world_size < 1 or args.layers < 1 or args.iters < 1 or args.cv < 0:
        raise SystemExit("--world-size, --layers and --iters must be >= 1 and --cv >= 0")
    backend = args.backend if args.mode == "dwdp" else None
    print(f"# deepseek_layer: mode={args.mode} size={args.size} layers={args.layers} weights={args.weights} "
          f"world={args.world_size} prompt_mean={args.prompt_mean} cv={args.cv} max_num_tokens={args.max_num_tokens} "
          f"gpus={gpus}", flush=True)
    results = dc.testing.launch(_launched, args.world_size, vars(args), backend=None, timeout=3000)
    summary = summarize(args, results)
    print(f"{'rank':>4} {'iter ms (median)':>17} {'tok/s':>10} {'exposed %':>9} {'prefetch GB':>11} "
          f"{'weights GB':>10} {'used GB':>8} {'rel err':>9}")
    ok = True
    for r in results:
        lat = sorted(r["iter_latency_ms"])[len(r["iter_latency_ms"]) // 2]
        err = r.get("rel_error")
        ok &= err is None or err <= args.tolerance
        print(f"{r['rank']:>4} {lat:>17.2f} {r['tokens_per_s']:>10.0f} {100 * r['exposed_fraction']:>9.2f} "
              f"{r['prefetch_nbytes'] / 1e9:>11.2f} {r['weights_nbytes'] / 1e9:>10.2f} "
              f"{r['device_used_nbytes'] / 1e9:>8.2f} {'-' if err is None else f'{err:.2e}':>9}")
    print(f"# tokens/s/GPU: {summary['tokens_per_s_per_gpu']:.1f}")
    if args.json:
        commit = os.environ.get("DWDP_GIT_COMMIT") or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        meta = {"machine": platform.node(), "gpus": [torch.cuda.get_device_name(i) for i in range(gpus)],
                "torch": torch.__version__, "commit": commit,
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "args": vars(args), **summary}, f, indent=1)
    if not ok:
        print(f"# FAILED: relative error above {args.tolerance}", file=sys.stderr)
        return 1
    return 0


def _launched(args_dict):
    return rank_main(args_dict)


if __name__ == "__main__":
    sys.exit(main())

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
and exits with status 1 if the relative error exceeds ``--tolerance`` (2e-2); when it does not,
it prints ``check passed (tolerance ...)``. Memory columns are in the unit that fits (B to GiB). The check is per MoE
layer, on the very input the layer saw: through several layers, a rounding difference can flip a
token's top-k choice in a later layer, which says nothing about the weights being right (the
end-to-end error is reported too, for information).

``--cuda-graph`` (GPU, ``--mode dwdp``): every iteration has the first batch's shape (a graph has
static shapes; new inputs each iteration); after the warm-up the whole forward of all layers (every
prefetch, wait and release included) is captured once in a ``torch.cuda.graph`` and each timed
iteration is one replay. The replayed output is checked against an eager forward of the same input
(``graph_vs_eager_rel_error``, same ``--tolerance``).

Examples::

    python examples/deepseek_layer.py --size toy --world-size 3               # CPU, sim backend
    python examples/deepseek_layer.py --mode dwdp --world-size 4 --prompt-mean 16384 --cv 0.2
    python examples/deepseek_layer.py --mode dwdp --world-size 2 --layers 2 --prompt-mean 2048 --cuda-graph
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
    ap.add_argument("--cuda-graph", action="store_true",
                    help="capture one forward of all layers in a CUDA graph and replay it (GPU, --mode dwdp)")
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
        pipe = getattr(self.moes[0].block, "pipeline", None)
        if pipe is not None:
            pipe.begin()  # start (or resync, or start a captured forward) before the first layer
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
    """Bytes in use on the device (all allocators, VMM included); 0 on CPU (not measured there)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return total - free
    return 0


class Runner:
    """One rank's model, built once; :meth:`run` measures one load point, :meth:`check` verifies.

    Building the weights dominates a run's setup (tens of GB at full size), so a sweep builds one
    ``Runner`` per (mode, weight format) and calls :meth:`run` for every point of its grid.
    Construction is collective (the store's commit, the DEP process group).
    """

    def __init__(self, args):
        self.args = args
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.on_gpu = torch.cuda.is_available()
        device = torch.device("cuda", torch.cuda.current_device()) if self.on_gpu else torch.device("cpu")
        self.device = device
        cfg = self.cfg = moe.DEEPSEEK_V3 if args.size == "full" else moe.TOY
        dtype = self.dtype = torch.bfloat16
        layers = self.layers = list(range(args.layers))
        lay = dc.ExpertLayout(cfg.num_experts, self.world, self.rank)
        self.mem0 = device_used_bytes(device)
        self.attn = [moe.MLAttention(cfg, moe.attention_weights(cfg, args.seed, l, device=device, dtype=dtype))
                     for l in layers]
        self.norms = [(a.w["attn_norm"], a.w["ffn_norm"]) for a in self.attn]
        self.routers = [moe.router_weights(cfg, args.seed, l, device=device) for l in layers]
        self.shared = [moe.shared_expert_weights(cfg, args.seed, l, device=device, dtype=dtype) for l in layers]
        self.group = self.store = self.pf = self.pipe = None
        if args.mode == "dwdp":
            self.group = dc.init(args.backend)
            self.store = dc.WeightStore(self.group, lay)
            for l in layers:
                for name, t in moe.expert_weights(cfg, args.seed, l, lay.local_experts, fmt=args.weights,
                                                  device=device).items():
                    self.store.register(l, name, t)
            self.store.commit()
            self.pf = dc.Prefetcher(self.store, depth=args.depth, schedule=args.schedule,
                                    chunk_nbytes=int(args.chunk_mib * 2**20))
            self.pipe = moe.DwdpPipeline(self.pf, layers)
            blocks = [moe.DwdpMoE(cfg, l, self.routers[l], self.shared[l], self.pipe, fmt=args.weights,
                                  kernel_backend=args.kernel_backend) for l in layers]
        elif args.mode == "dep":
            pg = dist.new_group(backend="nccl") if self.on_gpu else None
            blocks = [moe.DepMoE(cfg, lay, self.routers[l], self.shared[l],
                                 moe.expert_weights(cfg, args.seed, l, lay.local_experts, fmt=args.weights,
                                                    device=device),
                                 group=pg, fmt=args.weights, kernel_backend=args.kernel_backend) for l in layers]
        else:
            blocks = [SingleMoE(cfg, self.routers[l], self.shared[l],
                                moe.expert_weights(cfg, args.seed, l, range(cfg.num_experts), fmt=args.weights,
                                                   device=device),
                                args.weights, args.kernel_backend) for l in layers]
        self.blocks = [Recorder(b) for b in blocks]
        self.model = Model(cfg, self.attn, self.blocks, self.norms)
        if self.on_gpu:
            torch.cuda.empty_cache()  # drop the generator's temporaries: count what the model holds
        self.mem_weights = device_used_bytes(device) - self.mem0
        self.first = None  # (input, seq_lens, output, [(moe_in, moe_out) per layer]) of the first batch
        if self.pipe:
            self.pipe.start()

    def _sync(self):
        if self.on_gpu:
            torch.cuda.synchronize()

    def run(self, prompt_mean: int, cv: float, max_num_tokens: int, iters: int, warmup: int,
            record: bool = False) -> dict:
        """Prefill ``warmup + iters`` iterations of this rank's requests; time the last ``iters``.

        Collective in DEP mode (every rank runs the same number of iterations). ``record`` keeps
        the first iteration's inputs and outputs for :meth:`check`.
        """
        args, cfg, device = self.args, self.cfg, self.device
        n_batches = warmup + iters
        lengths = prompt_lengths(self.rank, args.seed + prompt_mean, prompt_mean, cv, 64 * n_batches,
                                 max_num_tokens)
        plan = batches(lengths, max_num_tokens)[:n_batches]
        if len(plan) < n_batches:
            raise RuntimeError("not enough requests for the iterations asked")
        graph = None
        use_graph = getattr(args, "cuda_graph", False)  # callers that build their own args (perf/sweep_deepseek.py)
        if use_graph:
            plan = [plan[0]] * n_batches  # one static shape: the first batch's requests, new inputs each time
        gen = torch.Generator(device=device).manual_seed(args.seed * 31 + self.rank)
        inputs = [torch.randn(sum(b), cfg.hidden, generator=gen, device=device, dtype=torch.float32).to(self.dtype)
                  for b in plan]
        times = []
        if self.pipe:
            self.pipe.exposed_seconds(reset=True)
        if self.on_gpu:
            torch.cuda.reset_peak_memory_stats(device)
        dist.barrier()
        for i, (x, seq) in enumerate(zip(inputs, plan)):
            for b in self.blocks:
                b.active = record and i == 0
            if use_graph and i == warmup:  # warm-up done eagerly: capture once, replay from now on
                graph, static_x, static_y = self._capture(x, seq)
            self._sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                if graph is not None:
                    static_x.copy_(x)
                    graph.replay()
                    y = static_y
                else:
                    y = self.model(x, seq)
            self._sync()
            dt = time.perf_counter() - t0
            if record and i == 0:
                self.first = (x, seq, y, [b.seen for b in self.blocks])
                for b in self.blocks:
                    b.active, b.seen = False, None
            if i >= warmup:
                times.append((dt, sum(seq)))
            if i == warmup - 1 and self.pipe:
                self.pipe.exposed_seconds(reset=True)
        graph_err = None
        if graph is not None:  # the last replay against an eager forward of the same input
            replayed = y.clone()
            with torch.no_grad():
                eager = self.model(static_x.clone(), plan[0])
            graph_err = float((replayed.double() - eager.double()).norm() / eager.double().norm())
            self.pipe.prepare_capture()  # the eager forward left prefetches in flight
            del graph
        exposed = self.pipe.exposed_seconds() if self.pipe else 0.0
        total_t = sum(t for t, _ in times)
        total_tok = sum(n for _, n in times)
        pf, store = self.pf, self.store
        return {"rank": self.rank, "prompt_mean": prompt_mean, "cv": cv, "max_num_tokens": max_num_tokens,
                "iter_latency_ms": [round(t * 1e3, 3) for t, _ in times],
                "tokens": [n for _, n in times], "tokens_per_s": total_tok / total_t if total_t else 0.0,
                "exposed_prefetch_s": exposed, "exposed_fraction": exposed / total_t if total_t else 0.0,
                "prefetch_nbytes": pf.nbytes_prefetched if pf else 0, "weights_nbytes": self.mem_weights,
                "device_used_nbytes": device_used_bytes(device) - self.mem0,
                "torch_peak_nbytes": torch.cuda.max_memory_allocated(device) if self.on_gpu else 0,
                "backend": self.group.backend if self.group else None,
                "slot_nbytes": pf.slot_nbytes if pf else 0,
                "remote_nbytes_per_layer": store.remote_nbytes(self.layers[0]) if store else 0,
                "cuda_graph": bool(use_graph), "graph_vs_eager_rel_error": graph_err}

    def _capture(self, x, seq_lens):
        """Capture one forward of every layer (prefetches, waits and releases included) in a CUDA graph.

        The pipeline is drained first (``prepare_capture``: host-blocking); inside the capture
        ``DwdpPipeline.begin()`` notices the capture and records a self-contained forward."""
        self.pipe.prepare_capture()
        static_x = x.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            static_y = self.model(static_x, seq_lens)
        return graph, static_x, static_y

    def close_pipeline(self) -> None:
        """Stop prefetching and free the slots (before :meth:`check`, which needs the memory)."""
        if self.pipe:
            self.pipe.close()
            self.pipe = None
        self.blocks = self.model = None
        if self.pf:
            self.pf.close()
            self.pf = None

    def check(self) -> dict:
        """Each MoE layer's output on the recorded batch against the reference (all experts rebuilt
        from the seed, reference kernels), and the end-to-end error for information."""
        if self.first is None:
            raise RuntimeError("check() needs a run(..., record=True) first")
        self.close_pipeline()
        args, cfg, device, layers = self.args, self.cfg, self.device, self.layers
        rel = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm())
        x, seq, first_out, seen = self.first
        per_layer = []
        with torch.no_grad():
            for l in layers:
                full = moe.expert_weights(cfg, args.seed, l, range(cfg.num_experts), fmt=args.weights, device=device)
                moe_in, moe_out = seen[l]
                per_layer.append(rel(moe_out, moe.reference_moe(cfg, moe_in, self.routers[l], self.shared[l], full,
                                                                fmt=args.weights)))
                x = x + self.attn[l](moe.rms_norm(x, self.norms[l][0], cfg.rms_eps), seq)
                x = x + moe.reference_moe(cfg, moe.rms_norm(x, self.norms[l][1], cfg.rms_eps), self.routers[l],
                                          self.shared[l], full, fmt=args.weights)
                del full
        return {"rel_error_per_layer": per_layer, "rel_error": max(per_layer),
                "rel_error_end_to_end": rel(first_out, x)}

    def close(self) -> None:
        self.close_pipeline()
        if self.store:
            self.store.close()
        if self.group:
            self.group.close()


def rank_main(args_dict: dict):
    args = argparse.Namespace(**args_dict)
    runner = Runner(args)
    try:
        res = runner.run(args.prompt_mean, args.cv, args.max_num_tokens, args.iters, args.warmup,
                         record=not args.no_check)
        if not args.no_check:
            res.update(runner.check())
    finally:
        runner.close()
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
    if args.cuda_graph and (not gpus or args.mode != "dwdp"):
        raise SystemExit("--cuda-graph needs a GPU and --mode dwdp")
    if args.cuda_graph and args.warmup < 1:
        raise SystemExit("--cuda-graph needs --warmup >= 1 (the warm-up runs eagerly before the capture)")
    backend = args.backend if args.mode == "dwdp" else None
    print(f"# deepseek_layer: mode={args.mode} size={args.size} layers={args.layers} weights={args.weights} "
          f"world={args.world_size} prompt_mean={args.prompt_mean} cv={args.cv} max_num_tokens={args.max_num_tokens} "
          f"gpus={gpus}", flush=True)
    results = dc.testing.launch(_launched, args.world_size, vars(args), backend=None, timeout=3000)
    summary = summarize(args, results)
    # device memory (weights, used) is measured on GPUs only; '-' on CPU
    mem_keys = ("prefetch_nbytes", "weights_nbytes", "device_used_nbytes") if gpus else ("prefetch_nbytes",)
    unit, scale = memory_unit(max(r[k] for r in results for k in mem_keys))

    def mem(nbytes: int, width: int) -> str:
        return f"{nbytes / scale:>{width}.2f}" if gpus else f"{'-':>{width}}"

    print(f"{'rank':>4} {'iter ms (median)':>17} {'tok/s':>10} {'exposed %':>9} {'prefetch ' + unit:>12} "
          f"{'weights ' + unit:>11} {'used ' + unit:>9} {'rel err':>9}")
    ok, errors = True, []
    for r in results:
        lat = sorted(r["iter_latency_ms"])[len(r["iter_latency_ms"]) // 2]
        err = r.get("rel_error")
        ok &= err is None or err <= args.tolerance
        if err is not None:
            errors.append(err)
        gerr = r.get("graph_vs_eager_rel_error")
        if gerr is not None:
            ok &= gerr <= args.tolerance
            print(f"# rank {r['rank']}: CUDA graph replay vs eager forward, relative error {gerr:.2e}")
        print(f"{r['rank']:>4} {lat:>17.2f} {r['tokens_per_s']:>10.0f} {100 * r['exposed_fraction']:>9.2f} "
              f"{r['prefetch_nbytes'] / scale:>12.2f} {mem(r['weights_nbytes'], 11)} "
              f"{mem(r['device_used_nbytes'], 9)} {'-' if err is None else f'{err:.2e}':>9}")
    if not gpus:
        print("# weights, used: device memory, measured on GPUs only (-: not measured on CPU)")
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
    if errors:
        print(f"# check passed (tolerance {args.tolerance:g}): largest per-MoE-layer relative error "
              f"{max(errors):.2e} against the single-device reference, {len(errors)} ranks")
    else:
        print("# no check ran (--no-check)")
    return 0


def memory_unit(largest_nbytes: float) -> tuple[str, float]:
    """The unit (B, KiB, MiB, GiB) in which ``largest_nbytes`` reads between 1 and 1024, and its size."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if largest_nbytes >= scale:
            return unit, float(scale)
    return "B", 1.0


def _launched(args_dict):
    return rank_main(args_dict)


if __name__ == "__main__":
    sys.exit(main())

"""A reusable DeepSeek-V3 prefill runner: one rank's decoder layers in DWDP, DEP or single-device
mode, measured per load point and checked against a single-device reference.

``examples/deepseek_layer.py`` (one load point) and ``perf/sweep_deepseek.py`` (a grid of load
points per build) both run on it: building the weights dominates a run's setup, so a sweep builds
one :class:`Runner` per (mode, weight format) and calls :meth:`Runner.run` for every point.
Every rank runs inside a launched group (``torch.distributed`` initialised, as
:func:`dwdp_comm.testing.launch` does).
"""

from __future__ import annotations

import json
import math
import os
import time

import torch
import torch.distributed as dist

from ..group import init
from ..layout import ExpertLayout
from ..prefetch import Prefetcher
from ..store import WeightStore
from .deepseek import DEEPSEEK_V3, TOY, MLAttention, attention_weights, rms_norm
from .layers import (DepMoE, DwdpMoE, DwdpPipeline, expert_weights, reference_moe, route_tokens, routed_experts,
                     router_weights, shared_expert, shared_expert_weights)

__all__ = ["prompt_lengths", "batches", "Recorder", "Model", "SingleMoE", "device_used_bytes", "Runner",
           "log_point", "partial_points", "tokens_per_s_per_gpu", "memory_unit"]


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
            x = x + att(rms_norm(x, n1, self.cfg.rms_eps), seq_lens)
            x = x + block(rms_norm(x, n2, self.cfg.rms_eps))
        return x


class SingleMoE(torch.nn.Module):
    """All experts on this device, torch kernels: the single-GPU mode."""

    def __init__(self, cfg, router, shared, experts, fmt, kernel_backend):
        super().__init__()
        self.cfg, self.router, self.shared, self.experts, self.fmt, self.kb = cfg, router, shared, experts, fmt, kernel_backend

    def forward(self, x):
        ids, wts = route_tokens(self.cfg, x, self.router)
        return routed_experts(x, ids, wts, self.experts, self.fmt, self.kb) + shared_expert(x, self.shared)


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

    Parameters
    ----------
    args : argparse.Namespace or any object with these attributes
        ``mode`` ({"dwdp", "dep", "single"}), ``size`` ({"full", "toy"}), ``layers`` (int),
        ``weights`` ({"bf16", "fp8", "fp8_block"}), ``seed`` (int), ``backend`` (dwdp_comm backend, dwdp),
        ``depth``, ``schedule``, ``chunk_mib`` (the prefetcher's, dwdp), ``kernel_backend``, and
        optionally ``cuda_graph`` (bool, default False: capture the forward and replay it).
    """

    def __init__(self, args):
        self.args = args
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.on_gpu = torch.cuda.is_available()
        device = torch.device("cuda", torch.cuda.current_device()) if self.on_gpu else torch.device("cpu")
        self.device = device
        cfg = self.cfg = DEEPSEEK_V3 if args.size == "full" else TOY
        dtype = self.dtype = torch.bfloat16
        layers = self.layers = list(range(args.layers))
        lay = ExpertLayout(cfg.num_experts, self.world, self.rank)
        self.mem0 = device_used_bytes(device)
        self.attn = [MLAttention(cfg, attention_weights(cfg, args.seed, l, device=device, dtype=dtype))
                     for l in layers]
        self.norms = [(a.w["attn_norm"], a.w["ffn_norm"]) for a in self.attn]
        self.routers = [router_weights(cfg, args.seed, l, device=device) for l in layers]
        self.shared = [shared_expert_weights(cfg, args.seed, l, device=device, dtype=dtype) for l in layers]
        self.group = self.store = self.pf = self.pipe = None
        if args.mode == "dwdp":
            self.group = init(args.backend)
            self.store = WeightStore(self.group, lay)
            for l in layers:
                for name, t in expert_weights(cfg, args.seed, l, lay.local_experts, fmt=args.weights,
                                                  device=device).items():
                    self.store.register(l, name, t)
            self.store.commit()
            self.pf = Prefetcher(self.store, depth=args.depth, schedule=args.schedule,
                                    chunk_nbytes=int(args.chunk_mib * 2**20))
            self.pipe = DwdpPipeline(self.pf, layers)
            blocks = [DwdpMoE(cfg, l, self.routers[l], self.shared[l], self.pipe, fmt=args.weights,
                                  kernel_backend=args.kernel_backend) for l in layers]
        elif args.mode == "dep":
            pg = dist.new_group(backend="nccl") if self.on_gpu else None
            blocks = [DepMoE(cfg, lay, self.routers[l], self.shared[l],
                                 expert_weights(cfg, args.seed, l, lay.local_experts, fmt=args.weights,
                                                    device=device),
                                 group=pg, fmt=args.weights, kernel_backend=args.kernel_backend) for l in layers]
        else:
            blocks = [SingleMoE(cfg, self.routers[l], self.shared[l],
                                expert_weights(cfg, args.seed, l, range(cfg.num_experts), fmt=args.weights,
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
        the first iteration's inputs and outputs for :meth:`check`. With ``warmup``, one untimed
        forward of the largest batch runs first (the allocator's growth is not timed). With
        ``cuda_graph``, every iteration is the first batch; after the warm-up, ``iters`` eager
        forwards of that batch are timed (``eager_same_batch_latency_ms``: the same work as a replay),
        then it is captured and each timed iteration is a replay (``iter_latency_ms``).
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
        if warmup and not use_graph:
            # One untimed forward of the largest batch first: the caching allocator then holds what
            # every iteration needs. Else a timed iteration larger than all before it pays cudaMalloc
            # (or a cudaFree-and-retry), a one-time cost that is not the forward's.
            big = max(range(len(plan)), key=lambda k: sum(plan[k]))
            with torch.no_grad():
                self.model(torch.randn_like(inputs[big]), plan[big])
        eager_same = []  # graph mode: eager forwards of the captured batch, the same work as a replay
        dist.barrier()
        for i, (x, seq) in enumerate(zip(inputs, plan)):
            for b in self.blocks:
                b.active = record and i == 0
            if use_graph and i == warmup:  # warm-up done eagerly: capture once, replay from now on
                for _ in range(iters):
                    self._sync()
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        self.model(x, seq)
                    self._sync()
                    eager_same.append(time.perf_counter() - t0)
                graph, static_x, static_y = self.capture(x, seq)
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
                "cuda_graph": bool(use_graph), "graph_vs_eager_rel_error": graph_err,
                "eager_same_batch_latency_ms": [round(t * 1e3, 3) for t in eager_same]}

    def capture(self, x, seq_lens):
        """Capture one forward of every layer (prefetches, waits and releases included) in a CUDA graph.

        The pipeline is drained first (``prepare_capture``: host-blocking); inside the capture
        ``DwdpPipeline.begin()`` notices the capture and records a self-contained forward. Returns
        ``(graph, static_x, static_y)``: copy new inputs into ``static_x``, ``graph.replay()``, read
        ``static_y``."""
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
                full = expert_weights(cfg, args.seed, l, range(cfg.num_experts), fmt=args.weights, device=device)
                moe_in, moe_out = seen[l]
                per_layer.append(rel(moe_out, reference_moe(cfg, moe_in, self.routers[l], self.shared[l], full,
                                                                fmt=args.weights)))
                x = x + self.attn[l](rms_norm(x, self.norms[l][0], cfg.rms_eps), seq)
                x = x + reference_moe(cfg, rms_norm(x, self.norms[l][1], cfg.rms_eps), self.routers[l],
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


def log_point(log_dir: str, rank: int, result: dict) -> None:
    """Append one :meth:`Runner.run` result of ``rank`` to ``log_dir/rank<rank>.jsonl``, so that a
    launch cut short (time-out, out of memory at a large point) still reports the points it finished
    (:func:`partial_points`)."""
    with open(os.path.join(log_dir, f"rank{rank}.jsonl"), "a") as fh:
        fh.write(json.dumps(result) + "\n")


def partial_points(log_dir: str, world: int) -> list | None:
    """The points every one of ``world`` ranks logged (:func:`log_point`) before a launch failed,
    as ``[{"points": [...], "check": None}]`` per rank (a launch's result shape); None when some rank
    logged nothing."""
    ranks = []
    for r in range(world):
        try:
            with open(os.path.join(log_dir, f"rank{r}.jsonl")) as fh:
                ranks.append({"points": [json.loads(line) for line in fh if line.strip()], "check": None})
        except OSError:
            return None
    n = min(len(r["points"]) for r in ranks)
    if n == 0:
        return None
    for r in ranks:
        r["points"] = r["points"][:n]
    return ranks


def tokens_per_s_per_gpu(mode: str, ranks: list[dict]) -> float:
    """The group's prefill rate per GPU from every rank's :meth:`Runner.run` result: in ``dep``
    mode ranks run in lock-step, so the rate is bounded by the slowest rank's time; otherwise the
    mean of the ranks' own rates."""
    if mode == "dep":
        tok = sum(sum(r["tokens"]) for r in ranks)
        return tok / max(sum(r["iter_latency_ms"]) / 1e3 for r in ranks) / len(ranks)
    return sum(r["tokens_per_s"] for r in ranks) / len(ranks)


def memory_unit(largest_nbytes: float) -> tuple[str, float]:
    """The unit (B, KiB, MiB, GiB) in which ``largest_nbytes`` reads between 1 and 1024, and its size."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if largest_nbytes >= scale:
            return unit, float(scale)
    return "B", 1.0

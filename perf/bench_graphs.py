"""DWDP forward eager vs CUDA graph: host time per layer and iteration time, 1K-16K tokens per rank.

Each rank runs ``--layers`` DeepSeek-V3-like MoE blocks (``dwdp_comm.moe.DwdpMoE``: hidden 7168,
expert intermediate 2048, one shared expert, top-8 routing; ``--experts`` routed experts, 32 by
default so that several layers of two ranks fit one GPU) whose routed experts come through a
``DwdpPipeline`` (prefetch of layer l+1 while layer l computes). For every token count:

* eager: ``--iters`` forwards; host time = time the Python call takes to enqueue the forward (no
  sync inside), iteration time = wall time from the start of the call to the end of the GPU work.
* graph: the same forward captured once in a ``torch.cuda.graph`` (after ``prepare_capture``) and
  replayed ``--iters`` times with new inputs copied into the static input; host time = the
  ``replay()`` call, iteration time as above. The first replay's output is checked against an eager
  forward on the same input (max abs error, reported).

Per-layer host time = host time / layers. ``ratio_iter`` = eager / graph iteration time. Ranks run
concurrently; with fewer GPUs than ranks they share GPUs (rank r on GPU r % n): the JSON says so
(``ranks_share_gpus``), and iteration times then include the other rank's work on the same GPU.

Usage::

    python3 -m perf.bench_graphs [--tokens 1024,2048,4096,8192,16384] [--out FILE]   (default $OUT/bench_graphs.json)
    python3 -m perf.bench_graphs --smoke --out FILE     # CPU: sim backend, toy sizes, eager only (no graphs)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before torch is imported
import torch  # noqa: E402

import dwdp_comm as dc  # noqa: E402
from dwdp_comm import moe  # noqa: E402
from dwdp_comm.bench import record  # noqa: E402
from perf import dwdp_stack  # noqa: E402



def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default=None, help="tokens per rank, comma-separated (default 1K..16K; smoke: 16,32)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=32, help="routed experts per layer (DeepSeek-V3 has 256)")
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--backend", default=None, help="dwdp_comm backend (default cuda_ipc; smoke: sim)")
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--smoke", action="store_true", help="CPU run: sim backend, toy sizes, eager only")
    ap.add_argument("--out", default=None, help="JSON file (default $OUT/bench_graphs.json)")
    return ap.parse_args(argv)


def _timed(fn, sync, iters: int) -> tuple[list[float], list[float]]:
    """``iters`` calls of ``fn``: (host seconds of each call, seconds from its start to the device's end)."""
    host, total = [], []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        sync()
        host.append(t1 - t0)
        total.append(time.perf_counter() - t0)
    return host, total


def _stats(host, total, layers) -> dict:
    med = statistics.median
    return {"host_ms": med(host) * 1e3, "host_us_per_layer": med(host) / layers * 1e6, "iter_ms": med(total) * 1e3,
            "iter_ms_all": [round(t * 1e3, 4) for t in total]}


def rank_main(group, argd: dict):
    args = argparse.Namespace(**argd)
    cfg = dwdp_stack.config(args.smoke, args.experts)
    dev = group.device
    gpu = dev.type == "cuda"
    layers = list(range(args.layers))
    stack = dwdp_stack.build(group, cfg, layers, args.seed, args.depth)
    st, pf, pipe, forward = stack.store, stack.prefetcher, stack.pipe, stack.forward
    sync = torch.cuda.synchronize if gpu else (lambda: None)

    gen = torch.Generator(device=dev).manual_seed(args.seed + group.rank)
    out = []
    for T in args.token_list:
        x = torch.randn(T, cfg.hidden, generator=gen, device=dev).to(torch.bfloat16)
        row = {"tokens_per_rank": T}
        with torch.no_grad():
            for _ in range(args.warmup):
                forward(x)
            group.barrier()
            row["eager"] = _stats(*_timed(lambda: forward(x), sync, args.iters), args.layers)
            if gpu:
                pipe.prepare_capture()
                static_x = x.clone()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static_y = forward(static_x)
                static_x.copy_(torch.randn(T, cfg.hidden, generator=gen, device=dev).to(torch.bfloat16))
                graph.replay()
                sync()
                got = static_y.float().clone()
                want = forward(static_x.clone()).float()
                sync()
                pipe.prepare_capture()  # the eager check above left prefetches in flight
                row["graph_check_max_abs_err"] = float((got - want).abs().max().item())
                row["graph_check_rel_err"] = float((got - want).norm() / want.norm().clamp_min(1e-30))
                group.barrier()
                row["graph"] = _stats(*_timed(graph.replay, sync, args.iters), args.layers)
                row["ratio_iter"] = row["eager"]["iter_ms"] / row["graph"]["iter_ms"]
                row["ratio_host"] = row["eager"]["host_ms"] / row["graph"]["host_ms"]
                del graph, static_y
                torch.cuda.empty_cache()
            else:
                row["graph"] = None  # sim: no CUDA graphs
        out.append(row)
        group.barrier()
    res = {"rank": group.rank, "backend": group.backend, "rows": out,
           "device": torch.cuda.get_device_name(dev) if gpu else "cpu",
           "remote_nbytes_per_layer": st.remote_nbytes(layers[0]), "prefetched_nbytes": pf.nbytes_prefetched}
    pipe.close()
    st.close()
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    backend = args.backend or ("sim" if args.smoke else "cuda_ipc")
    default_tokens = "16,32" if args.smoke else "1024,2048,4096,8192,16384"
    args.token_list = [int(t) for t in (args.tokens or default_tokens).split(",")]
    if args.smoke:
        args.layers, args.iters, args.warmup = min(args.layers, 2), min(args.iters, 2), 1
    path = record.result_path(args.out, "bench_graphs.json")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    print(f"# bench_graphs: backend={backend} world={args.world_size} gpus={gpus} layers={args.layers} "
          f"experts={args.experts if not args.smoke else moe.TOY.num_experts} tokens={args.token_list}", flush=True)
    results = dc.testing.launch(rank_main, args.world_size, vars(args), backend=backend, timeout=3000)
    cfg = dwdp_stack.config(args.smoke, args.experts)
    meta = {"machine": platform.node(), "date": record.utc_date(), "commit": record.commit() or "", "torch": torch.__version__, "gpus": [torch.cuda.get_device_name(i) for i in range(gpus)],
            "world_size": args.world_size, "backend": backend,
            "ranks_share_gpus": bool(gpus) and args.world_size > gpus,
            "note": ("ranks share GPUs: iteration times include the other ranks' work on the same GPU; host times "
                     "are per rank") if gpus and args.world_size > gpus else "",
            "model": {"hidden": cfg.hidden, "moe_intermediate": cfg.moe_intermediate, "num_experts": cfg.num_experts,
                      "top_k": cfg.top_k, "layers": args.layers, "depth": args.depth}}
    print(f"{'rank':>4} {'tokens':>7} {'eager host us/layer':>20} {'graph host us/layer':>20} {'eager ms':>9} "
          f"{'graph ms':>9} {'eager/graph':>11} {'max err':>9}")
    for r in results:
        for row in r["rows"]:
            g = row["graph"]
            print(f"{r['rank']:>4} {row['tokens_per_rank']:>7} {row['eager']['host_us_per_layer']:>20.1f} "
                  f"{(g['host_us_per_layer'] if g else float('nan')):>20.1f} {row['eager']['iter_ms']:>9.3f} "
                  f"{(g['iter_ms'] if g else float('nan')):>9.3f} {row.get('ratio_iter', float('nan')):>11.3f} "
                  f"{row.get('graph_check_max_abs_err', float('nan')):>9.2e}")
    if path:
        with open(path, "w") as f:
            json.dump({"meta": meta, "per_rank": results}, f, indent=1)
        print(f"# wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

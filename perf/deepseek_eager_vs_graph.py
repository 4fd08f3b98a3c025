"""DeepSeek-V3 layers (``examples/deepseek_layer.py``'s model), eager against CUDA graph on exactly the
same work, and where the eager iterations of the example lose their time.

Issue 24 measured, on one H100, ``examples/deepseek_layer.py --mode dwdp --world-size 1 --layers 1
--prompt-mean 4096``: eager iterations 65-128 ms (median 108 ms at ~7.2K tokens), the same layer
replayed from a CUDA graph 18.5 ms. Those two numbers are not the same work: with ``--cuda-graph``
every iteration is the first batch (4602 tokens, one request, for that seed), while the eager
iterations are the next batches (6050, 7093, 6065, 7415 tokens, one or two requests each), every
one a shape no iteration had before (the warm-up ran the first batch only). This script takes the
example's model (:class:`dwdp_comm.moe.runner.Runner`) and batches (same seed, prompt mean, CV,
token budget) and times, per iteration:

* ``example``: the batches after the first, each once, warm-up on the first only: how the example
  timed eager iterations before (new shapes: the caching allocator grows, cuBLAS picks new plans);
* ``seen``: the same batches again (every shape seen once): the same work without first-use costs;
* ``eager``: the first batch, repeated: exactly the work a replay does;
* ``graph``: the first batch captured once (``Runner.capture``) and replayed.

Per iteration: tokens, requests, host time per layer (the Python call that enqueues the forward,
no sync after it; it includes any host synchronisation inside), iteration time (call start to the
device's end), and the caching allocator's new segments and ``cudaMalloc`` retries during it. One
extra eager forward runs under ``torch.cuda.set_sync_debug_mode("warn")`` to count the host
synchronisations of a forward and say where they come from.

Usage (one GPU; ``--world-size`` ranks share it if more)::

    python -m perf.deepseek_eager_vs_graph [--layers 1] [--prompt-mean 4096] [--iters 4] [--out FILE]
    python -m perf.deepseek_eager_vs_graph --smoke --out FILE     # CPU: toy model, sim, eager only
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

import dwdp_comm as dc
from dwdp_comm.bench import record
from dwdp_comm.moe.runner import Runner, batches, prompt_lengths


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--world-size", type=int, default=1)
    ap.add_argument("--prompt-mean", type=int, default=None, help="default 4096 (toy: 24)")
    ap.add_argument("--cv", type=float, default=0.2)
    ap.add_argument("--max-num-tokens", type=int, default=None, help="default 2 x prompt mean (the example's)")
    ap.add_argument("--iters", type=int, default=4, help="timed iterations of each phase (the example's default)")
    ap.add_argument("--weights", choices=("bf16", "fp8"), default="bf16")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--backend", default=None, help="dwdp_comm backend (default auto; smoke: sim)")
    ap.add_argument("--smoke", action="store_true", help="CPU run: toy model, sim backend, no graphs")
    ap.add_argument("--out", default=None, help="write the results (JSON, with the run record) here")
    return ap.parse_args(argv)


def _runner_args(args) -> argparse.Namespace:
    return argparse.Namespace(mode="dwdp", size="toy" if args.smoke else "full", layers=args.layers,
                              weights=args.weights, seed=args.seed, backend=args.backend or ("sim" if args.smoke
                                                                                            else "auto"),
                              depth=2, schedule="round_robin", chunk_mib=8.0, kernel_backend="auto", cuda_graph=False)


def _alloc_counts(device) -> tuple[int, int]:
    if device.type != "cuda":
        return 0, 0
    st = torch.cuda.memory_stats(device)
    return int(st.get("segment.all.allocated", 0)), int(st.get("num_alloc_retries", 0))


def _timed(fn, device, layers: int, tokens: int, requests: int, phase: str) -> dict:
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    seg0, retry0 = _alloc_counts(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        fn()
    t1 = time.perf_counter()
    sync()
    t2 = time.perf_counter()
    seg1, retry1 = _alloc_counts(device)
    return {"phase": phase, "tokens": tokens, "requests": requests, "host_ms_per_layer": (t1 - t0) * 1e3 / layers,
            "iter_ms": (t2 - t0) * 1e3, "new_segments": seg1 - seg0, "alloc_retries": retry1 - retry0}


def _host_syncs(model, x, seq) -> list[str]:
    """Where one eager forward synchronises the host with the device (torch's sync debug mode)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.no_grad():
                model(x, seq)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message).lower()]


def rank_main(argd: dict) -> dict:
    args = argparse.Namespace(**argd)
    runner = Runner(_runner_args(args))
    try:
        return _measure(args, runner)
    finally:
        runner.close()


def _measure(args, runner: Runner) -> dict:
    dev, cfg, L = runner.device, runner.cfg, args.layers
    n = 1 + args.iters
    lengths = prompt_lengths(runner.rank, args.seed + args.prompt_mean, args.prompt_mean, args.cv, 64 * n,
                             args.max_num_tokens)
    plan = batches(lengths, args.max_num_tokens)[:n]
    gen = torch.Generator(device=dev).manual_seed(args.seed * 31 + runner.rank)
    inputs = [torch.randn(sum(b), cfg.hidden, generator=gen, device=dev, dtype=torch.float32).to(runner.dtype)
              for b in plan]
    model, rows = runner.model, []
    step = lambda k: (lambda: model(inputs[k], plan[k]))  # noqa: E731
    with torch.no_grad():
        model(inputs[0], plan[0])  # the example's warm-up: the first batch only
    for k in range(1, n):
        rows.append(_timed(step(k), dev, L, sum(plan[k]), len(plan[k]), "example"))
    for k in range(1, n):
        rows.append(_timed(step(k), dev, L, sum(plan[k]), len(plan[k]), "seen"))
    for _ in range(args.iters):
        rows.append(_timed(step(0), dev, L, sum(plan[0]), len(plan[0]), "eager"))
    syncs = _host_syncs(model, inputs[0], plan[0]) if dev.type == "cuda" else None
    graph_err = None
    if dev.type == "cuda":
        graph, static_x, static_y = runner.capture(inputs[0], plan[0])
        for _ in range(args.iters):
            static_x.copy_(inputs[0])  # outside the timing, as a server fills its static input
            rows.append(_timed(graph.replay, dev, L, sum(plan[0]), len(plan[0]), "graph"))
        static_x.copy_(inputs[0])
        graph.replay()
        torch.cuda.synchronize(dev)
        replayed = static_y.double().clone()
        with torch.no_grad():
            eager = model(inputs[0], plan[0]).double()
        graph_err = float((replayed - eager).norm() / eager.norm())
        runner.pipe.prepare_capture()
        del graph
    summary = {}
    for phase in ("example", "seen", "eager", "graph"):
        sel = [r for r in rows if r["phase"] == phase]
        if sel:
            summary[phase] = {"iter_ms": statistics.median(r["iter_ms"] for r in sel),
                              "host_ms_per_layer": statistics.median(r["host_ms_per_layer"] for r in sel),
                              "tokens": statistics.median(r["tokens"] for r in sel)}
    if "graph" in summary:
        summary["eager_over_graph_same_work"] = summary["eager"]["iter_ms"] / summary["graph"]["iter_ms"]
    summary["example_over_seen"] = summary["example"]["iter_ms"] / summary["seen"]["iter_ms"]
    return {"rank": runner.rank, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "batches": [[int(v) for v in b] for b in plan], "rows": rows, "summary": summary,
            "host_syncs_per_forward": syncs, "graph_vs_eager_rel_error": graph_err}


def main(argv=None) -> int:
    args = parse_args(argv)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not args.smoke and not gpus:
        raise SystemExit("needs a GPU (or --smoke for the CPU run)")
    args.prompt_mean = args.prompt_mean or (24 if args.smoke else 4096)
    args.max_num_tokens = args.max_num_tokens or 2 * args.prompt_mean
    print(f"# deepseek_eager_vs_graph: layers={args.layers} world={args.world_size} prompt_mean={args.prompt_mean} "
          f"cv={args.cv} max_num_tokens={args.max_num_tokens} iters={args.iters} gpus={gpus}", flush=True)
    results = dc.testing.launch(rank_main, args.world_size, vars(args), backend=None, timeout=3000)
    print(f"{'rank':>4} {'phase':>8} {'tokens':>7} {'reqs':>4} {'host ms/layer':>13} {'iter ms':>9} "
          f"{'new segs':>8} {'retries':>7}")
    for r in results:
        for row in r["rows"]:
            print(f"{r['rank']:>4} {row['phase']:>8} {row['tokens']:>7} {row['requests']:>4} "
                  f"{row['host_ms_per_layer']:>13.3f} {row['iter_ms']:>9.3f} {row['new_segments']:>8} "
                  f"{row['alloc_retries']:>7}")
        s = r["summary"]
        line = (f"# rank {r['rank']}: example {s['example']['iter_ms']:.2f} ms ({s['example']['tokens']:.0f} tok), the "
                f"same batches seen before {s['seen']['iter_ms']:.2f} ms")
        if "graph" in s:
            line += (f"; first batch ({s['eager']['tokens']:.0f} tok) eager {s['eager']['iter_ms']:.2f} ms vs graph "
                     f"{s['graph']['iter_ms']:.2f} ms: {s['eager_over_graph_same_work']:.2f}x; host ms/layer eager "
                     f"{s['eager']['host_ms_per_layer']:.3f}, graph {s['graph']['host_ms_per_layer']:.3f}; "
                     f"replay vs eager rel err {r['graph_vs_eager_rel_error']:.1e}")
        print(line)
        if r["host_syncs_per_forward"] is not None:
            print(f"# rank {r['rank']}: {len(r['host_syncs_per_forward'])} host synchronisations per eager forward: "
                  f"{sorted(set(r['host_syncs_per_forward']))}")
    if args.out:
        doc = {"benchmark": "deepseek_eager_vs_graph", "args": vars(args),
               "run": {"commit": record.commit(short=True), "dirty": record.is_dirty(), "date": record.utc_date(),
                       "host": record.host(), **record.versions(), "gpus": record.gpu_names()},
               "per_rank": results}
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"# wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

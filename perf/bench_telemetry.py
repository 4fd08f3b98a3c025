"""Telemetry overhead: DWDP forwards with telemetry off, on, and on with routing histograms, side by side.

Each rank runs ``--layers`` DeepSeek-V3-like MoE blocks (``dwdp_comm.moe.DwdpMoE``: hidden 7168,
expert intermediate 2048, one shared expert, top-8 routing, ``--experts`` routed experts) whose
routed experts come through a ``DwdpPipeline``, as ``perf/bench_graphs.py`` does. For every token
count, ``--rounds`` rounds each run ``--iters`` forwards in every mode, the modes in a rotated order
per round (so that drift hits all of them alike):

* ``off``: telemetry disabled (the default);
* ``on``: ``pipe.enable_telemetry()``: per prefetch and source, CUDA timing events on the copy lanes
  (where the copy engine is timed) and on the compute stream around each wait and release;
* ``routing``: ``pipe.enable_telemetry(routing=True)``: the same plus the expert-choice counts
  (two small kernels a layer).

Iteration time = wall time from the call to the end of the device's work (median); host time = the
Python call alone (median). The records are read back (``pipe.telemetry(reset=True)``, which
waits for them) between rounds, outside the timed forwards; its cost per forward is reported as
``readback_ms``. Ratios (``on / off``, ``routing / off``) come from the same run. Then
``--trace-forwards`` forwards at the middle token count are recorded with routing and written as
one Chrome-trace / Perfetto JSON of every rank (``--trace``); render it with ``perf/trace_png.py``.

With fewer GPUs than ranks, ranks share a GPU (rank r on GPU r % n; "peer" copies are then
same-device copies): the ratios still compare the same work with and without telemetry.

Usage (from the repository root, ``PYTHONPATH=$PWD``)::

    python3 perf/bench_telemetry.py [--world-size 2] [--tokens 256,2048,8192] --out FILE.json --trace TRACE.json
    python3 perf/bench_telemetry.py --smoke --out FILE.json --trace TRACE.json   # CPU: sim backend, toy sizes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

import dwdp_comm as dc
from dwdp_comm.bench import record
from perf import dwdp_stack
from dwdp_comm.telemetry import Telemetry
from dwdp_comm.trace import write_trace

MODES = ("off", "on", "routing")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default=None, help="tokens per rank, comma-separated (default 256,2048,8192; "
                    "smoke: 16,32)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=32, help="routed experts per layer (DeepSeek-V3 has 256)")
    ap.add_argument("--world-size", type=int, default=None, help="ranks (default: the GPUs, at least 2)")
    ap.add_argument("--backend", default=None, help="dwdp_comm backend (default cuda_ipc; smoke: sim)")
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10, help="timed forwards per mode and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--trace-forwards", type=int, default=3, help="forwards recorded for the trace")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--smoke", action="store_true", help="CPU run: sim backend, toy sizes")
    ap.add_argument("--out", default=None, help="JSON results (default $OUT/bench_telemetry.json)")
    ap.add_argument("--trace", default=None, help="trace file (default: next to --out, bench_telemetry_trace.json)")
    return ap.parse_args(argv)


def _set_mode(pipe, mode: str) -> None:
    if mode == "off":
        pipe.disable_telemetry()
    else:
        pipe.enable_telemetry(routing=mode == "routing")


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
    rows = []
    with torch.no_grad():
        for T in args.token_list:
            x = torch.randn(T, cfg.hidden, generator=gen, device=dev).to(torch.bfloat16)
            for _ in range(args.warmup):
                forward(x)
            times = {m: {"host": [], "iter": []} for m in MODES}
            readback = []
            for rnd in range(args.rounds):
                for m in MODES[rnd % 3:] + MODES[:rnd % 3]:
                    _set_mode(pipe, m)
                    group.barrier()
                    for _ in range(args.iters):
                        sync()
                        t0 = time.perf_counter()
                        forward(x)
                        t1 = time.perf_counter()
                        sync()
                        times[m]["host"].append(t1 - t0)
                        times[m]["iter"].append(time.perf_counter() - t0)
                    if m != "off":  # read the records back outside the timed forwards
                        t0 = time.perf_counter()
                        pipe.telemetry(reset=True)
                        readback.append((time.perf_counter() - t0) / args.iters)
            pipe.disable_telemetry()
            pipe.telemetry(reset=True)
            med = statistics.median
            row = {"tokens_per_rank": T}
            for m in MODES:
                row[m] = {"iter_ms": med(times[m]["iter"]) * 1e3,
                          "host_us_per_layer": med(times[m]["host"]) / args.layers * 1e6,
                          "iter_ms_all": [round(t * 1e3, 4) for t in times[m]["iter"]]}
            row["ratio_on"] = row["on"]["iter_ms"] / row["off"]["iter_ms"]
            row["ratio_routing"] = row["routing"]["iter_ms"] / row["off"]["iter_ms"]
            row["host_ratio_on"] = row["on"]["host_us_per_layer"] / row["off"]["host_us_per_layer"]
            row["readback_ms_per_forward"] = med(readback) * 1e3 if readback else None
            rows.append(row)
            group.barrier()
        # the traced window: a few forwards at the middle token count, with routing
        T = args.token_list[len(args.token_list) // 2]
        x = torch.randn(T, cfg.hidden, generator=gen, device=dev).to(torch.bfloat16)
        forward(x)
        sync()
        pipe.telemetry(reset=True)
        group.barrier()
        with pipe.recording(routing=True):
            for _ in range(args.trace_forwards):
                forward(x)
        pipe.close()  # release the next forward's prefetches: their records complete too
        tel = pipe.telemetry(reset=True)
    res = {"rank": group.rank, "backend": group.backend, "rows": rows,
           "device": torch.cuda.get_device_name(dev) if gpu else "cpu", "engine_timed": tel.timed,
           "remote_nbytes_per_layer": st.remote_nbytes(layers[0]), "trace_tokens_per_rank": T,
           "telemetry": tel.as_dict()}
    pf.close()
    st.close()
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    backend = args.backend or ("sim" if args.smoke else "cuda_ipc")
    args.token_list = [int(t) for t in (args.tokens or ("16,32" if args.smoke else "256,2048,8192")).split(",")]
    if args.smoke:
        args.layers, args.iters, args.rounds, args.warmup = min(args.layers, 2), min(args.iters, 2), 2, 1
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    args.world_size = args.world_size or max(2, gpus)
    out = record.result_path(args.out, "bench_telemetry.json")
    trace = args.trace or (os.path.join(os.path.dirname(out) or ".", "bench_telemetry_trace.json") if out else None)
    print(f"# bench_telemetry: backend={backend} world={args.world_size} gpus={gpus} layers={args.layers} "
          f"experts={dwdp_stack.config(args.smoke, args.experts).num_experts} tokens={args.token_list} iters={args.iters} x {args.rounds} rounds",
          flush=True)
    results = dc.testing.launch(rank_main, args.world_size, vars(args), backend=backend, timeout=3000)
    tels = [r.pop("telemetry") for r in results]
    print(f"{'rank':>4} {'tokens':>7} {'off ms':>9} {'on ms':>9} {'routing ms':>10} {'on/off':>7} {'rout/off':>8} "
          f"{'host us/layer off':>17} {'on':>7} {'routing':>7} {'readback ms/fwd':>15}")
    for r in results:
        for row in r["rows"]:
            rb = row["readback_ms_per_forward"]
            print(f"{r['rank']:>4} {row['tokens_per_rank']:>7} {row['off']['iter_ms']:>9.3f} {row['on']['iter_ms']:>9.3f} "
                  f"{row['routing']['iter_ms']:>10.3f} {row['ratio_on']:>7.3f} {row['ratio_routing']:>8.3f} "
                  f"{row['off']['host_us_per_layer']:>17.1f} {row['on']['host_us_per_layer']:>7.1f} "
                  f"{row['routing']['host_us_per_layer']:>7.1f} {(rb if rb is not None else float('nan')):>15.3f}")
    if not all(r["engine_timed"] for r in results):
        print("# note: the copy engine does not time its copies here: 'on' records the compute-stream points and "
              "bytes only (no per-source copy times)")
    for t in tels:
        for line in Telemetry.from_dict(t).summary_lines():
            print(f"# {line}")
    cfg = dwdp_stack.config(args.smoke, args.experts)
    doc = {"record": {"date": record.utc_date(), "commit": record.commit(), "machine": record.machine_lines(),
                      "gpus": record.gpu_names()},
           "args": {k: v for k, v in vars(args).items()}, "world_size": args.world_size, "backend": backend,
           "ranks_share_gpus": bool(gpus) and args.world_size > gpus,
           "model": {"hidden": cfg.hidden, "moe_intermediate": cfg.moe_intermediate, "num_experts": cfg.num_experts,
                     "top_k": cfg.top_k, "layers": args.layers, "depth": args.depth},
           "per_rank": results, "trace": trace}
    if trace:
        write_trace(trace, tels, title=f"bench_telemetry {backend} x{args.world_size}, "
                                       f"{results[0]['trace_tokens_per_rank']} tokens/rank")
        print(f"# wrote trace {trace} (render: python3 perf/trace_png.py {trace} OUT.png)")
    if out:
        with open(out, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"# wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

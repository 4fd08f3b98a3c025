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

``--trace FILE`` (``--mode dwdp``) records the prefetch telemetry of the run (eager forwards, warm-up
included) and writes a Chrome-trace / Perfetto JSON of every rank's compute stream, prefetch jobs
and copies per peer; ``--telemetry FILE`` writes the records themselves, with the routing
histogram of every layer (``dwdp_comm.routing_histogram``). Both print one line per layer and rank.

Examples::

    python examples/deepseek_layer.py --size toy --world-size 3               # CPU, sim backend
    python examples/deepseek_layer.py --size toy --weights fp8-block          # block-FP8 experts, CPU
    python examples/deepseek_layer.py --mode dwdp --world-size 4 --prompt-mean 16384 --cv 0.2
    python examples/deepseek_layer.py --mode dwdp --world-size 2 --layers 2 --prompt-mean 2048 --cuda-graph

The model, the measurement and the check live in :mod:`dwdp_comm.moe.runner` (``perf/sweep_deepseek.py``
runs a grid of load points on the same :class:`~dwdp_comm.moe.runner.Runner`); this script parses the
command line, launches the ranks and prints the report.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

import dwdp_comm as dc
from dwdp_comm.bench import record
from dwdp_comm.moe.runner import Runner, memory_unit, tokens_per_s_per_gpu


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("dwdp", "dep", "single"), default="dwdp")
    ap.add_argument("--layers", type=int, default=4, help="MoE decoder layers (default 4)")
    ap.add_argument("--weights", choices=("bf16", "fp8", "fp8-block"), default="bf16",
                    help="routed-expert weight format: bf16, fp8 (per-channel scales) or fp8-block (DeepSeek-V3's "
                         "128 x 128 block scales, prefetched with the weights)")
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
    ap.add_argument("--trace", metavar="FILE", help="write a Chrome-trace / Perfetto JSON of the prefetches (--mode dwdp)")
    ap.add_argument("--telemetry", metavar="FILE", help="write the prefetch telemetry and routing histogram as JSON "
                    "(--mode dwdp)")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="capture one forward of all layers in a CUDA graph and replay it (GPU, --mode dwdp)")
    return ap.parse_args(argv)


def rank_main(args_dict: dict):
    args = argparse.Namespace(**args_dict)
    runner = Runner(args)
    try:
        if args.trace or args.telemetry:
            runner.pipe.enable_telemetry(routing=bool(args.telemetry))
        res = runner.run(args.prompt_mean, args.cv, args.max_num_tokens, args.iters, args.warmup,
                         record=not args.no_check)
        if args.trace or args.telemetry:
            res["telemetry"] = runner.pipe.telemetry().as_dict()
        if not args.no_check:
            res.update(runner.check())
    finally:
        runner.close()
    return res


def summarize(args, results) -> dict:
    return {"tokens_per_s_per_gpu": tokens_per_s_per_gpu(args.mode, results), "per_rank": results}


def main(argv=None) -> int:
    args = parse_args(argv)
    args.weights = args.weights.replace("-", "_")  # the library's format names (dwdp_comm.moe.EXPERT_NAMES)
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
    if (args.trace or args.telemetry) and args.mode != "dwdp":
        raise SystemExit("--trace and --telemetry need --mode dwdp (they record the prefetches)")
    if args.cuda_graph and args.warmup < 1:
        raise SystemExit("--cuda-graph needs --warmup >= 1 (the warm-up runs eagerly before the capture)")
    print(f"# deepseek_layer: mode={args.mode} size={args.size} layers={args.layers} weights={args.weights} "
          f"world={args.world_size} prompt_mean={args.prompt_mean} cv={args.cv} max_num_tokens={args.max_num_tokens} "
          f"gpus={gpus}", flush=True)
    results = dc.testing.launch(_launched, args.world_size, vars(args), backend=None, timeout=3000)
    _write_telemetry(args, [r.pop("telemetry") for r in results if "telemetry" in r])
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
            same = sorted(r["eager_same_batch_latency_ms"])
            print(f"# rank {r['rank']}: the same batch ({r['tokens'][0]} tokens) eager {same[len(same) // 2]:.2f} ms, "
                  f"replayed {lat:.2f} ms (medians)")
        print(f"{r['rank']:>4} {lat:>17.2f} {r['tokens_per_s']:>10.0f} {100 * r['exposed_fraction']:>9.2f} "
              f"{r['prefetch_nbytes'] / scale:>12.2f} {mem(r['weights_nbytes'], 11)} "
              f"{mem(r['device_used_nbytes'], 9)} {'-' if err is None else f'{err:.2e}':>9}")
    if not gpus:
        print("# weights, used: device memory, measured on GPUs only (-: not measured on CPU)")
    print(f"# tokens/s/GPU: {summary['tokens_per_s_per_gpu']:.1f}")
    if args.json:
        meta = {"machine": platform.node(), "gpus": [torch.cuda.get_device_name(i) for i in range(gpus)],
                "torch": torch.__version__, "commit": record.commit(short=True) or "", "date": record.utc_date()}
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


def _write_telemetry(args, telemetries: list) -> None:
    if not telemetries:
        return
    from dwdp_comm.telemetry import Telemetry, run_document
    from dwdp_comm.trace import write_trace
    for t in telemetries:
        for line in Telemetry.from_dict(t).summary_lines():
            print(f"# {line}")
    if args.trace:
        write_trace(args.trace, telemetries, title=f"deepseek_layer {args.size} x{args.world_size}")
        print(f"# wrote trace {args.trace} (open it at https://ui.perfetto.dev)")
    if args.telemetry:
        with open(args.telemetry, "w") as fh:
            json.dump(run_document(telemetries), fh)
        print(f"# wrote telemetry {args.telemetry}")


def _launched(args_dict):
    return rank_main(args_dict)


if __name__ == "__main__":
    sys.exit(main())

"""The fused route-permute (Triton: one pass, or two) against the torch ops it replaces, at every size.

Per family shape (experts, hidden, top-k) and token count: the route of
:func:`dwdp_comm.moe.lean.route_torch` (sort by expert, offsets, inverse, row and weight gathers:
about 15 ops) vs :func:`dwdp_comm.kernels.triton_route.route` in its one-pass form (one kernel,
work ``S x E`` a program; timed up to ``ONE_PASS_MAX_ROWS`` copies) and its two-pass form (count,
prefix sum, place: three launches), timed two ways with :class:`dwdp_comm.bench.timing.Timer`:
eager (back-to-back calls: the host's cost shows) and CUDA graph replays (the GPU's time alone).
Every form is checked equal to the torch route first. The ratios say where each form is the cheaper
path: ``triton_route.MAX_WORK`` (copies x padded experts) should sit where two passes overtake
one, and the fused route should beat the torch ops wherever :func:`~dwdp_comm.kernels.triton_route.fits`.

Ratio = t_torch / t_form (median of per-round ratios): > 1 means that form is faster. ``rule``:
the form :func:`~dwdp_comm.kernels.triton_route.one_pass` picks.

Usage: python3 -m perf.bench_route [--families ...] [--tokens 16,...,65536] [--json FILE]
       (default $OUT/bench_route.json when $OUT is set)
"""

from __future__ import annotations

import argparse
import sys

import torch

from dwdp_comm.bench import record
from dwdp_comm.bench.timing import Timer, summarize_times
from dwdp_comm.kernels import triton_route
from dwdp_comm.moe import lean

SHAPES = {"qwen3_moe": (128, 2048, 8), "deepseek_v3": (256, 7168, 8), "mixtral": (8, 4096, 2),
          "olmoe": (64, 2048, 8), "gpt_oss": (128, 2880, 4)}


def log(*a) -> None:
    print(*a, flush=True)


def graph_of(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def _same(a, b, n: int) -> bool:
    """Two routes equal on the ``n`` real rows (offsets, sources, rows, weights)."""
    return (torch.equal(a.offsets, b.offsets) and torch.equal(a.src, b.src) and torch.equal(a.rows[:n], b.rows[:n])
            and torch.equal(a.row_weights[:n], b.row_weights[:n]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(SHAPES))
    ap.add_argument("--tokens", default="16,64,256,1024,4096,16384,65536")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--block-ms", type=float, default=20.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        log("needs a CUDA GPU")
        return 2
    dev = torch.device("cuda")
    info = record.env_info(dev)
    log(f"# bench_route {info['date']} gpu={info.get('gpu')} torch={info['torch']} commit={info['git']['commit'][:12]} "
        f"MAX_WORK={triton_route.MAX_WORK} ONE_PASS_MAX_ROWS={triton_route.ONE_PASS_MAX_ROWS} "
        f"MAX_ROWS={triton_route.MAX_ROWS}")
    timer = Timer(dev, block_ms=args.block_ms, warmup_ms=100.0)
    rows, bad = [], 0
    for fam in args.families.split(","):
        e, h, k = SHAPES[fam]
        for t in [int(v) for v in args.tokens.split(",")]:
            s = t * k
            x = torch.randn(t, h, device=dev, dtype=torch.bfloat16)
            idx = torch.randn(t, e, device=dev).topk(k, dim=-1).indices
            w = torch.rand(t, k, device=dev, dtype=torch.bfloat16)
            why = triton_route.unavailable_reason(x, s, e)
            if why is not None:
                log(f"{fam} T={t}: fused route unavailable: {why}")
                continue
            fns = {"torch": lambda: lean.route_torch(x, idx, w, e)[0],
                   "two_pass": lambda: triton_route.route(x, idx, w, e, passes=2)}
            if s <= triton_route.ONE_PASS_MAX_ROWS:
                fns["one_pass"] = lambda: triton_route.route(x, idx, w, e, passes=1)
            a = fns["torch"]()
            n = int(a.offsets[-1])
            wrong = [name for name, fn in fns.items() if name != "torch" and not _same(a, fn(), n)]
            if wrong:
                bad += 1
                log(f"{fam} T={t}: {', '.join(wrong)} differ(s) from the torch route: WRONG (not timed)")
                continue
            rule = "one_pass" if triton_route.one_pass(s, e) else "two_pass"
            common = dict(family=fam, tokens=t, copies=s, experts=e, hidden=h, rule=rule)
            eager = summarize_times(timer.rounds(fns, args.rounds), "torch", 0.0, dict(common, mode="eager"), "route",
                                    timer.calls)
            graphs = {name: graph_of(fn) for name, fn in fns.items()}
            replays = timer.rounds({n_: g.replay for n_, g in graphs.items()}, args.rounds)
            replay = summarize_times(replays, "torch", 0.0, dict(common, mode="graph"), "route", timer.calls)
            rows += eager + replay
            r = {(x_["mode"], x_["variant"]): x_ for x_ in eager + replay}

            def cell(mode):
                return " ".join(f"{v}={r[mode, v]['ms'] * 1e3:7.1f}us" + ("" if v == "torch" else
                                f" ({r[mode, v]['ratio']:5.2f}x)") for v in fns)
            log(f"{fam:11s} T={t:5d} S={s:6d} rule={rule:8s} eager {cell('eager')} | gpu {cell('graph')}")
            del graphs
    result = dict(env=info, args=vars(args), max_work=triton_route.MAX_WORK, max_rows=triton_route.MAX_ROWS,
                  one_pass_max_rows=triton_route.ONE_PASS_MAX_ROWS,
                  method=__doc__.split("\n\n")[1], results=rows, wrong=bad)
    path = record.write_json(record.result_path(args.json, "bench_route.json"), result)
    if path:
        log(f"# wrote {path}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""DWDP against DEP on DeepSeek-V3 layers over a grid of load points, in one run.

For each (weights, mode) one set of ranks is launched and one model is built
(:class:`examples/deepseek_layer.Runner`); every grid point (prompt-length mean x CV) then runs on
it, so the weights are built once per mode. The first point of each launch is checked against the
reference (per MoE layer, relative error <= ``--tolerance``); a failed check fails the run.

Per point it reports tokens/s/GPU for DWDP and DEP (DEP's rate is bounded by its slowest rank:
every layer is collective), the DWDP/DEP speedup, DWDP's exposed prefetch time as a fraction of
its iteration time, and the roofline break-even: the tokens per rank at which one layer's MoE +
attention compute time equals its prefetch time (remote bytes / the prefetch bandwidth measured in
the same run, compute at the bf16 rate measured by a dense matmul in the same run).

Usage (repository root, on the GPU machine)::

    python3 -m perf.sweep_deepseek --means 4096,8192,16384,32768 --cvs 0,0.2,0.4 --weights bf16,fp8 \\
        --json $OUT/deepseek_sweep.json --plot $OUT/deepseek_sweep.png

On CPU (``--size toy``) it runs the same machinery on the sim backend (tests use that).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch

import dwdp_comm as dc
from dwdp_comm.bench import record
from dwdp_comm.moe.runner import (Runner, device_used_bytes, log_point, partial_points,
                                  tokens_per_s_per_gpu)


def _csv(kind):
    return lambda s: [kind(v) for v in s.split(",") if v.strip()]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--means", type=_csv(int), default=[4096, 8192, 16384, 32768], help="prompt-length means")
    ap.add_argument("--cvs", type=_csv(float), default=[0.0, 0.2, 0.4], help="coefficients of variation")
    ap.add_argument("--weights", type=_csv(str), default=["bf16", "fp8"], help="routed-expert formats")
    ap.add_argument("--modes", type=_csv(str), default=["dwdp", "dep"])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--world-size", type=int, default=None)
    ap.add_argument("--size", choices=("full", "toy"), default=None)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--schedule", default="round_robin")
    ap.add_argument("--chunk-mib", type=float, default=8.0)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--kernel-backend", default="auto")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--tolerance", type=float, default=2e-2)
    ap.add_argument("--timeout", type=float, default=3000.0, help="seconds per launch")
    ap.add_argument("--prefetch-gbps", type=float, default=None,
                    help="per-rank prefetch bandwidth for the break-even estimate (measure it in the same run, "
                         "e.g. perf/gpu_copy_plane.py's single pair)")
    ap.add_argument("--json")
    ap.add_argument("--plot")
    return ap.parse_args(argv)


def _rates(device) -> dict:
    """bf16 dense matmul TFLOP/s on this device (the compute roof of the break-even estimate)."""
    if device.type != "cuda":
        return {"bf16_TFLOPs": None}
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(10):
        a @ b
    e1.record()
    e1.synchronize()
    return {"bf16_TFLOPs": 10 * 2 * n ** 3 / (e0.elapsed_time(e1) / 1e3) / 1e12}


def _rank(args_dict: dict, mode: str, fmt: str, points: list, partial_dir: str) -> dict:
    """One rank of one (mode, weights) launch: build once, run every point, check the first.

    Each finished point is also appended to ``partial_dir/rank<r>.jsonl`` so that a launch cut
    short (time-out, out of memory at a large point) still reports the points it finished.
    """
    a = argparse.Namespace(**args_dict)
    a.mode, a.weights = mode, fmt
    t0 = time.perf_counter()
    runner = Runner(a)
    rank = runner.rank
    out = {"points": [], "check": None, "rates": _rates(runner.device), "build_s": time.perf_counter() - t0}
    if runner.on_gpu:
        out["memory_after_build"] = {"torch_allocated": torch.cuda.memory_allocated(),
                                     "torch_reserved": torch.cuda.memory_reserved(),
                                     "device_used": device_used_bytes(runner.device) - runner.mem0}
    if rank == 0:
        print(f"#   [{fmt} {mode}] built in {out['build_s']:.0f} s; {out.get('memory_after_build')}", flush=True)
    try:
        for i, (mean, cv) in enumerate(points):
            t1 = time.perf_counter()
            r = runner.run(mean, cv, 2 * mean, a.iters, a.warmup, record=i == 0)
            r["wall_s"] = time.perf_counter() - t1
            out["points"].append(r)
            log_point(partial_dir, rank, r)
            if rank == 0:
                print(f"#   [{fmt} {mode}] mean {mean} cv {cv}: {r['wall_s']:.1f} s, rank 0 {r['tokens_per_s']:.0f} tok/s, "
                      f"exposed {100 * r['exposed_fraction']:.1f} %", flush=True)
        out["check"] = runner.check()
    finally:
        runner.close()
    return out


def _break_even(cfg, remote_bytes: float, prefetch_Bps: float, tflops: float) -> float | None:
    """Tokens per rank per layer at which MoE + attention projections compute = the prefetch time.

    Counts routed + shared expert GEMMs and MLA projections (2 flops per MAC; attention's
    quadratic part excluded, so this is an upper bound on the break-even)."""
    if not (prefetch_Bps and tflops):
        return None
    h, i, k = cfg.hidden, cfg.moe_intermediate, cfg.top_k
    moe_flops = 2 * 3 * h * i * (k + cfg.num_shared_experts)
    attn_flops = 2 * (h * (cfg.q_lora_rank + cfg.kv_lora_rank + cfg.qk_rope_dim)
                      + cfg.q_lora_rank * cfg.num_heads * cfg.qk_head_dim
                      + cfg.kv_lora_rank * cfg.num_heads * (cfg.qk_nope_dim + cfg.v_head_dim)
                      + cfg.num_heads * cfg.v_head_dim * h)
    t_prefetch = remote_bytes / prefetch_Bps
    return t_prefetch * tflops * 1e12 / (moe_flops + attn_flops)


def _meta(gpus: int) -> dict:
    return {"machine": record.host(), "device_kind": os.environ.get("DWDP_DEVICE_KIND"),
            "gpus": record.gpu_names(gpus), "torch": torch.__version__,
            "commit": record.commit(short=True) or "", "date": record.utc_date()}


def _rows(args, runs: dict, points: list, cfg) -> tuple[list, dict]:
    """Per (weights, point) rows from the finished launches, and the measured rates."""
    rows = []
    for fmt in args.weights:
        dw, dp = runs.get((fmt, "dwdp"), {}), runs.get((fmt, "dep"), {})
        for j, (mean, cv) in enumerate(points):
            row = {"weights": fmt, "prompt_mean": mean, "cv": cv}
            for mode, run in (("dwdp", dw), ("dep", dp)):
                if "ranks" in run and j < len(run["ranks"][0]["points"]):
                    pr = [r["points"][j] for r in run["ranks"]]
                    row[f"{mode}_tok_s_gpu"] = tokens_per_s_per_gpu(mode, pr)
                    row[f"{mode}_iter_ms_max"] = max(max(r["iter_latency_ms"]) for r in pr)
                    row[f"{mode}_tokens_per_iter"] = [r["tokens"] for r in pr]
                    if mode == "dwdp":
                        row["exposed_fraction_max"] = max(r["exposed_fraction"] for r in pr)
                        row["remote_nbytes_per_layer"] = pr[0]["remote_nbytes_per_layer"]
                        row["slot_nbytes"] = pr[0]["slot_nbytes"]
                        row["device_used_nbytes_max"] = max(r["device_used_nbytes"] for r in pr)
                    else:
                        row["dep_device_used_nbytes_max"] = max(r["device_used_nbytes"] for r in pr)
            if "dwdp_tok_s_gpu" in row and "dep_tok_s_gpu" in row:
                row["speedup"] = row["dwdp_tok_s_gpu"] / row["dep_tok_s_gpu"]
            rows.append(row)
    rates = next((r["ranks"][0]["rates"] for r in runs.values() if "ranks" in r and "rates" in r["ranks"][0]), {})
    for r in rows:
        if "remote_nbytes_per_layer" in r and args.prefetch_gbps:
            r["break_even_tokens_per_rank"] = _break_even(cfg, r["remote_nbytes_per_layer"], args.prefetch_gbps * 1e9,
                                                          rates.get("bf16_TFLOPs"))
    return rows, rates


def _dump(args, gpus: int, runs: dict, points: list, cfg) -> None:
    rows, rates = _rows(args, runs, points, cfg)
    result = {"schema": "dwdp/deepseek_sweep/v1", "meta": _meta(gpus), "args": vars(args), "rates": rates,
              "rows": rows, "runs": {f"{k[0]}/{k[1]}": v for k, v in runs.items()}}
    with open(args.json, "w") as fh:
        json.dump(result, fh, indent=1)


def main(argv=None) -> int:
    args = parse_args(argv)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    args.size = args.size or ("full" if gpus else "toy")
    args.world_size = args.world_size or (gpus or 2)
    for m in args.modes:
        if m not in ("dwdp", "dep"):
            raise SystemExit(f"--modes: {m!r} is not one of dwdp, dep")
    points = [(m, c) for m in args.means for c in args.cvs]
    base = {"layers": args.layers, "size": args.size, "backend": args.backend, "depth": args.depth,
            "schedule": args.schedule, "chunk_mib": args.chunk_mib, "kernel_backend": args.kernel_backend,
            "seed": args.seed, "iters": args.iters, "warmup": args.warmup, "no_check": False}
    from dwdp_comm import moe
    cfg = moe.DEEPSEEK_V3 if args.size == "full" else moe.TOY
    print(f"# sweep_deepseek: size={args.size} world={args.world_size} layers={args.layers} "
          f"points={len(points)} weights={args.weights} modes={args.modes}", flush=True)
    runs, ok = {}, True
    for fmt in args.weights:
        for mode in args.modes:
            t0 = time.perf_counter()
            partial_dir = tempfile.mkdtemp(prefix="dwdp-sweep-")
            try:
                res = dc.testing.launch(_rank, args.world_size, base, mode, fmt, points, partial_dir, backend=None,
                                        timeout=args.timeout)
            except Exception as exc:  # one failed launch (e.g. fp8 unsupported) must not lose the others
                print(f"# {fmt} {mode}: FAILED: {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
                part = partial_points(partial_dir, args.world_size)
                runs[(fmt, mode)] = {"error": f"{type(exc).__name__}: {exc}", "partial": part is not None}
                if part:
                    runs[(fmt, mode)]["ranks"] = part
                    print(f"# {fmt} {mode}: {len(part[0]['points'])} of {len(points)} points finished before that",
                          flush=True)
                ok = False
                if args.json:
                    _dump(args, gpus, runs, points, cfg)
                continue
            finally:
                shutil.rmtree(partial_dir, ignore_errors=True)
            err = max(r["check"]["rel_error"] for r in res)
            ok &= err <= args.tolerance
            runs[(fmt, mode)] = {"ranks": res, "rel_error": err, "wall_s": time.perf_counter() - t0}
            print(f"# {fmt} {mode}: {time.perf_counter() - t0:.0f} s, reference check rel err {err:.2e} "
                  f"({'ok' if err <= args.tolerance else 'FAILED'})", flush=True)
            if args.json:  # after every launch: a later time-out still leaves these results
                _dump(args, gpus, runs, points, cfg)
    rows, rates = _rows(args, runs, points, cfg)
    print(f"{'weights':>7} {'mean':>6} {'cv':>4} {'dwdp tok/s/GPU':>15} {'dep tok/s/GPU':>14} {'speedup':>8} "
          f"{'exposed %':>9} {'break-even tok':>14}")
    for r in rows:
        f = lambda k, fmt: format(r[k], fmt) if r.get(k) is not None else "-"
        exp = f"{100 * r['exposed_fraction_max']:.1f}" if "exposed_fraction_max" in r else "-"
        print(f"{r['weights']:>7} {r['prompt_mean']:>6} {r['cv']:>4} {f('dwdp_tok_s_gpu', '.0f'):>15} "
              f"{f('dep_tok_s_gpu', '.0f'):>14} {f('speedup', '.3f'):>8} {exp:>9} "
              f"{f('break_even_tokens_per_rank', '.0f'):>14}")
    if args.json:
        _dump(args, gpus, runs, points, cfg)
    if args.plot:
        plot(rows, args.plot)
    if not ok:
        print("# FAILED: a launch failed or a reference check exceeded the tolerance", file=sys.stderr)
        return 1
    return 0


def plot(rows: list[dict], path: str) -> None:
    """Speedup (DWDP / DEP tokens/s/GPU) against prompt-length mean, one line per (weights, CV)."""
    try:
        import matplotlib
    except ImportError:
        print(f"# --plot {path}: matplotlib is not installed, no plot written", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    keys = sorted({(r["weights"], r["cv"]) for r in rows if "speedup" in r})
    for fmt, cv in keys:
        pts = sorted((r["prompt_mean"], r["speedup"]) for r in rows if "speedup" in r and (r["weights"], r["cv"]) == (fmt, cv))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ls="-" if fmt == "bf16" else "--",
                label=f"{fmt}, CV {cv:g}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt length mean (tokens)")
    ax.set_ylabel("DWDP / DEP tokens/s/GPU")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())

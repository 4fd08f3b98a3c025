"""Check ``dwdp-bench advise``'s predictions against measurements.

Two checks::

    # CPU, now: the copy-plane model (what advise uses for the prefetch) against the committed
    # 2 x H200 results (perf/results/contention_h200x2*.json, gpu_copy_plane_h200x2.json)
    python3 -m perf.validate_advise copy-plane --json perf/results/advise_copy_plane_h200x2.json

    # one H200 (~4 minutes): advise's compute (measured pieces, and the modelled FLOPs rate)
    # against the DeepSeek example's single-GPU iteration time at several token counts
    python3 -m perf.validate_advise compute --means 2048,4096,8192 --json $OUT/advise_compute_h200.json

``compute`` runs ``examples/deepseek_layer.py --mode single --size full --layers 2 --cv 0`` once per
prompt mean (two prompts of that length an iteration), then ``advise.measure_compute`` at the same
token counts in this process, and reports predicted / measured - 1 per point (aim: within 10 %).
Every document carries machine, date and commit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from dwdp_comm.bench import advise as A
from dwdp_comm.bench import model as M
from dwdp_comm.bench import record
from dwdp_comm.bench.contention import BenchConfig, run_model
from dwdp_comm.bench.patterns import make_plans, parse_schedule

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _meta() -> dict:
    return {"machine": record.machine_lines(), "commit": record.commit(short=True),
            "date": record.utc_date(), "command": sys.argv}


# ---- copy plane (CPU) ------------------------------------------------------------------------------
def _key(r: dict) -> tuple:
    return (r["pattern"], r["schedule"], r["chunk_nbytes"], r["nbytes"])


def contention_rows(path: str) -> list[dict]:
    """Each measured row of a committed contention JSON beside the model's prediction of it."""
    with open(path) as f:
        doc = json.load(f)
    c = doc["config"]
    def predicted(base_options: dict) -> dict:
        cfg = BenchConfig(group_size=c["group_size"], sizes=c["sizes"], chunks=c["chunks"], schedules=c["schedules"],
                          patterns=c["patterns"], skew=c["skew"], iters=max(c["iters"], 5), warmup=0,
                          engine_options=base_options, seed=c["seed"], inject_corruption=False, backend="model",
                          fabric="h200", executor="per_stream", arbitration="fair", issue_order="stream")
        return {_key(r): r for r in run_model(cfg)["rows"] if r["status"] == "ok"}
    # the GPU engine's default api is batch, the model's memcpy: match the GPU; schedules that
    # cannot take batch (graph captures single copies) keep the measured options
    pred = {**predicted(dict(c["engine_options"])), **predicted({"api": "batch", **c["engine_options"]})}
    out = []
    for r in doc["rows"]:
        if r["status"] != "ok":
            continue
        p = pred.get(_key(r))
        if p is None:
            continue
        out.append({"source": os.path.basename(path), "backend": doc["backend"], "pattern": r["pattern"],
                    "schedule": r["schedule"], "chunk_nbytes": r["chunk_nbytes"], "nbytes": r["nbytes"],
                    "skew": c["skew"], "measured_agg_GBps": r["agg_GBps"], "model_agg_GBps": p["agg_GBps"],
                    "error": p["agg_GBps"] / r["agg_GBps"] - 1.0})
    return out


def single_pair_rows(path: str) -> list[dict]:
    """The library's single-pair pull (1 GiB, memcpy or batch, by chunk) against the model."""
    with open(path) as f:
        doc = json.load(f)
    fab = M.h200(2)
    out = []
    for be, b in doc["backends"].items():
        sp = b["ranks"][0]["single_pair"]
        n = sp["nbytes"]
        for name, v in sp["lib"].items():
            api, mib = name.split("/")
            chunk = int(mib.removesuffix("MiB")) << 20
            sch = parse_schedule("naive" + ("+api=batch" if api == "batch" else ""))
            plans = make_plans("pair", sch, 2, n, 0 if chunk >= n else chunk)
            t = M.simulate(plans, fab, options=sch.engine_options(2, {})).makespan
            model = n / t / 1e9
            out.append({"source": os.path.basename(path), "backend": be, "pattern": "pair", "api": api,
                        "chunk_nbytes": chunk, "nbytes": n, "measured_GBps": v["GBps_median"],
                        "model_GBps": model, "error": model / v["GBps_median"] - 1.0})
    return out


def deepseek_speedups(res_dir: str) -> list[dict]:
    """DWDP / DEP speedups of the committed 2 x H200 DeepSeek sweeps against advise (modelled
    compute: only the ratio is compared; that run's absolute rates are far below the later
    single-H200 measurement the modelled rate is calibrated to)."""
    out = []
    for w in ("bf16", "fp8"):
        with open(os.path.join(res_dir, f"deepseek_sweep_h200x2_{w}_partial.json")) as f:
            doc = json.load(f)
        for r in doc["rows"]:
            if r.get("speedup") is None:
                continue
            mean = r["prompt_mean"]
            pred = A.advise("deepseek-v3", 2, weights=w, measure="no", mean_tokens=2 * mean, cv=r["cv"], cvs=[r["cv"]],
                            seq_len=mean, sweep=[2 * mean])["point"]["speedup"]
            out.append({"weights": w, "layers": doc["args"]["layers"], "prompt_mean": mean, "cv": r["cv"],
                        "measured_speedup": r["speedup"], "predicted_speedup": pred,
                        "error": pred / r["speedup"] - 1.0})
    return out


def copy_plane(args) -> dict:
    res = os.path.join(ROOT, "perf", "results")
    rows = []
    for name in ("contention_h200x2.json", "contention_h200x2_nvshmem.json", "contention_h200x2_skew.json"):
        rows += contention_rows(os.path.join(res, name))
    pair = single_pair_rows(os.path.join(res, "gpu_copy_plane_h200x2.json"))
    errs = [abs(r["error"]) for r in rows]
    summary = {"contention_rows": len(rows), "contention_median_abs_error": sorted(errs)[len(errs) // 2],
               "contention_max_abs_error": max(errs),
               "contention_within_10pct": sum(e <= 0.10 for e in errs),
               "single_pair_max_abs_error": max(abs(r["error"]) for r in pair)}
    by = {}
    for r in rows:
        by.setdefault(r["schedule"], []).append(abs(r["error"]))
    summary["contention_max_abs_error_by_schedule"] = {k: max(v) for k, v in sorted(by.items())}
    worst = sorted(rows, key=lambda r: -abs(r["error"]))[:8]
    print(f"# copy plane, model (h200, per_stream, fair) against 2 x H200: {summary}")
    print("# worst rows:")
    for r in worst:
        print(f"#   {r['source']} {r['pattern']} {r['schedule']} chunk {r['chunk_nbytes']} size {r['nbytes']}: "
              f"measured {r['measured_agg_GBps']:.0f} GB/s, model {r['model_agg_GBps']:.0f} ({100 * r['error']:+.1f} %)")
    for r in pair:
        print(f"# single pair {r['backend']} {r['api']} chunk {r['chunk_nbytes'] >> 20} MiB: measured "
              f"{r['measured_GBps']:.1f}, model {r['model_GBps']:.1f} ({100 * r['error']:+.1f} %)")
    speed = deepseek_speedups(res)
    for r in speed:
        print(f"# DeepSeek x{r['layers']} layers, 2 x H200, {r['weights']} prompt {r['prompt_mean']} cv {r['cv']}: "
              f"speedup measured {r['measured_speedup']:.3f}, predicted {r['predicted_speedup']:.3f} "
              f"({100 * r['error']:+.1f} %)")
    return {"schema": "dwdp-bench/advise-validation/copy-plane/v1", "meta": _meta(),
            "deepseek_speedup_h200x2": speed,
            "note": "model computed on CPU from the committed measurements; the measurements' own machine/date/commit "
                    "are in their files", "summary": summary, "single_pair": pair, "rows": rows}


# ---- compute (one GPU) -----------------------------------------------------------------------------
def compute(args) -> dict:
    import torch
    if args.size == "full" and not torch.cuda.is_available():
        raise SystemExit("compute: --size full needs a CUDA GPU (run it on the device machine; --size toy on CPU)")
    if args.size == "full":
        shape = A.get_shape("deepseek-v3")
    else:  # the example's toy size: the same plumbing on the CPU (a smoke test, not a validation)
        from dwdp_comm.moe import TOY as t
        shape = A.MoEShape(name="toy", hidden=t.hidden, moe_intermediate=t.moe_intermediate, num_experts=t.num_experts,
                           top_k=t.top_k, num_shared_experts=t.num_shared_experts, attention="mla", num_heads=t.num_heads,
                           q_lora_rank=t.q_lora_rank, kv_lora_rank=t.kv_lora_rank, qk_nope_dim=t.qk_nope_dim,
                           qk_rope_dim=t.qk_rope_dim, v_head_dim=t.v_head_dim)
    device = None if torch.cuda.is_available() else "cpu"
    points = []
    for mean in args.means:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
            path = fh.name
        cmd = [sys.executable, os.path.join(ROOT, "examples", "deepseek_layer.py"), "--mode", "single", "--size", args.size,
               "--layers", str(args.layers), "--weights", args.weights, "--prompt-mean", str(mean), "--cv", "0",
               "--iters", str(args.iters), "--warmup", "1", "--no-check", "--json", path]
        print("# " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT, timeout=args.timeout)
        with open(path) as f:
            ex = json.load(f)
        r = ex["per_rank"][0]
        lat = sorted(r["iter_latency_ms"])[len(r["iter_latency_ms"]) // 2] / 1e3
        tokens = sorted(r["tokens"])[len(r["tokens"]) // 2]
        points.append({"prompt_mean": mean, "tokens": tokens, "measured_iter_s": lat, "example_meta": ex["meta"]})
        _write(args, {"partial": True, "points": points})
    meas = {}
    for p in points:  # seq lens differ per point: one measurement per point
        c = A.measure_compute(shape, [p["tokens"]], A.Load((p["tokens"],), p["prompt_mean"]), args.weights,
                              device=device)
        meas[p["tokens"]] = c.points[p["tokens"]]
    for p in points:
        t, ld = p["tokens"], A.Load((p["tokens"],), p["prompt_mean"])
        m = meas[t]
        mod = A.modelled_compute(shape, [t], ld, args.weights).points[t]
        p["measured_pieces_s"] = m
        p["predicted_measured_s"] = args.layers * sum(m.values())
        p["predicted_modelled_s"] = args.layers * sum(mod.values())
        p["error_measured"] = p["predicted_measured_s"] / p["measured_iter_s"] - 1
        p["error_modelled"] = p["predicted_modelled_s"] / p["measured_iter_s"] - 1
        print(f"# tokens {t} (2 x {p['prompt_mean']}): example {1e3 * p['measured_iter_s']:.1f} ms; advise "
              f"measured pieces {1e3 * p['predicted_measured_s']:.1f} ms ({100 * p['error_measured']:+.1f} %), "
              f"modelled {1e3 * p['predicted_modelled_s']:.1f} ms ({100 * p['error_modelled']:+.1f} %)", flush=True)
    return {"schema": "dwdp-bench/advise-validation/compute/v1", "meta": _meta(), "size": args.size,
            "layers": args.layers,
            "weights": args.weights, "points": points,
            "max_abs_error_measured": max(abs(p["error_measured"]) for p in points),
            "max_abs_error_modelled": max(abs(p["error_modelled"]) for p in points)}


def _write(args, doc: dict) -> None:
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    cp = sub.add_parser("copy-plane")
    cp.add_argument("--json")
    c = sub.add_parser("compute")
    c.add_argument("--means", type=lambda s: [int(v) for v in s.split(",") if v.strip()], default=[2048, 4096, 8192])
    c.add_argument("--layers", type=int, default=2)
    c.add_argument("--size", default="full", choices=["full", "toy"], help="toy: a CPU smoke run of the plumbing")
    c.add_argument("--weights", default="bf16", choices=["bf16", "fp8"])
    c.add_argument("--iters", type=int, default=3)
    c.add_argument("--timeout", type=float, default=200.0, help="seconds per example launch")
    c.add_argument("--json")
    args = ap.parse_args(argv)
    doc = copy_plane(args) if args.what == "copy-plane" else compute(args)
    _write(args, doc)
    if args.json:
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

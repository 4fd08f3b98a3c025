"""Check ``dwdp-bench advise``'s predictions against measurements.

Two checks::

    # CPU, now: the copy-plane model (what advise uses for the prefetch) against the committed
    # 2 x H200 results (perf/results/contention_h200x2*.json, gpu_copy_plane_h200x2.json)
    python3 perf/validate_advise.py copy-plane --json perf/results/advise_copy_plane_h200x2.json

    # one H200 (~4 minutes): advise's compute (measured pieces, and the modelled FLOPs rate)
    # against the DeepSeek example's single-GPU iteration time at several token counts
    python3 perf/validate_advise.py compute --means 2048,4096,8192 --json $OUT/advise_compute_h200.json

    # one GPU of each kind (H100, H200; ~2 minutes): advise knows its GPU. Measures this machine's
    # fabric (calibrate --write), runs advise --measure yes --fabric auto, and again on the measured
    # file; checks the fabric named is this GPU kind's, and prints measured against preset values
    python3 perf/validate_advise.py fabric --json $OUT/advise_fabric_<gpu>.json

    # CPU, now: the hot-expert answer on DeepSeek-V3, 4 x H200 (modelled compute), for a Zipf-skewed
    # and a flat routing histogram over a range of loads
    python3 perf/validate_advise.py hot --json perf/results/advise_hot_deepseek_v3_h200x4.json

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

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from dwdp_comm.bench import advise as A  # noqa: E402
from dwdp_comm.bench import record  # noqa: E402
from dwdp_comm.bench.contention import BenchConfig, run_model  # noqa: E402
from dwdp_comm.bench.patterns import make_plans, parse_schedule  # noqa: E402
from dwdp_comm.bench import model as M  # noqa: E402


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


# ---- hot-expert replication (CPU) -------------------------------------------------------------------
def zipf_histogram(num_experts: int, s: float, rows: int, layers: int, seed: int = 0) -> dict:
    """Per layer, counts falling as 1 / rank^s over the experts, ranks shuffled over expert ids
    (each layer its own shuffle: its own hot set); ``s = 0`` is flat."""
    import random
    out = {}
    for i in range(layers):
        ids = list(range(num_experts))
        random.Random(seed + i).shuffle(ids)
        w = [1 / (j + 1) ** s for j in range(num_experts)]
        c = [0] * num_experts
        for j, e in enumerate(ids):
            c[e] = round(rows * w[j] / sum(w))
        out[str(3 + i)] = c
    return out


def hot(args) -> dict:
    """The hot-expert answer of advise on DeepSeek-V3 (modelled compute, the h200 fabric) for a
    Zipf-skewed and a flat histogram, at each load of ``--tokens``."""
    shape = A.get_shape(args.model)
    cases = []
    for s in args.zipf:
        counts = zipf_histogram(shape.num_experts, s, args.hist_tokens * shape.top_k, args.layers)
        top = max(max(c) for c in counts.values())
        hist = {"top_k": shape.top_k, "layers": counts}
        for t in args.tokens:
            res = A.advise(shape, args.group_size, weights=args.weights, measure="no", fabric=args.fabric,
                           mean_tokens=t, cv=args.cv, routing=hist, schedules=["parallel", "round_robin"],
                           chunks=[0, 8 << 20])
            h = res["hot"]
            case = {"zipf_s": s, "tokens_per_rank": t, "cv": args.cv, "answer": h["answer"],
                    "hot_experts": h["hot_experts"], "hot_share": h["point"]["hot_share"],
                    "tokens_per_s_per_gpu": h["tokens_per_s_per_gpu"],
                    "dep_owner_skew": res["point"]["dep_owner_skew"], "hot_owner_skew": h["point"]["owner_skew"],
                    "hot_prefetch_s": h["point"]["prefetch_s"], "dwdp_prefetch_s": res["point"]["prefetch_s"],
                    "min_tokens_vs_dep": h["min_tokens"], "best_range": h["best_range"], "memory_hot": h["memory"],
                    "memory": res["memory"], "fabric": res["inputs"]["fabric"]["name"], "reason": h["reason"]}
            cases.append(case)
            tps = case["tokens_per_s_per_gpu"]
            print(f"# zipf s={s:g} (top expert {top / (args.hist_tokens * shape.top_k):.1%} of rows), {t} tok/rank: "
                  f"answer {h['answer']:4s} (hot {h['hot_experts']} experts, {case['hot_share']:.0%} of rows): "
                  f"DEP {tps['dep']:.0f}, DWDP {tps['dwdp']:.0f}, hot {tps['hot']:.0f} tok/s/GPU; " +
                  (f"hot beats DEP from {mt:.0f} tokens per rank" if (mt := h["min_tokens"].get(str(float(args.cv))))
                   else "hot never beats DEP in the sweep"), flush=True)
    return {"schema": "dwdp-bench/advise-validation/hot/v1", "meta": _meta(),
            "note": "CPU run of the model: compute modelled (FLOPs at the H200-calibrated rate), prefetch from the "
                    "contention model on the named fabric; histograms generated (zipf_histogram in this script, "
                    "seeded), not recorded on a GPU",
            "model": args.model, "group_size": args.group_size, "weights": args.weights, "layers": args.layers,
            "hist_tokens": args.hist_tokens, "cases": cases}


# ---- the advisor knows its GPU (one GPU) ----------------------------------------------------------------
def fabric(args) -> dict:
    """Measure this machine's fabric, then advise with --fabric auto and with the measured file."""
    import torch
    from dwdp_comm.bench import calibrate
    from dwdp_comm.bench import fabric as F
    if not torch.cuda.is_available():
        raise SystemExit("fabric: needs a CUDA GPU (run it on the device machine)")
    name = torch.cuda.get_device_name()
    kind = F.detect_preset(name)
    path = args.fabric_file or os.path.join(tempfile.mkdtemp(), "fabric.json")
    measured = calibrate.write_fabric(path, nbytes=args.bytes, command=sys.argv)
    runs = {}
    for spec in ("auto", path):
        res = A.advise(args.model, args.group_size, weights=args.weights, measure="yes", fabric=spec,
                       mean_tokens=args.tokens, cv=args.cv, sweep=args.sweep)
        fc = res["inputs"]["fabric_choice"]
        runs["auto" if spec == "auto" else "file"] = {
            "fabric": res["inputs"]["fabric"], "fabric_choice": fc, "sources": res["sources"], "point": res["point"],
            "choice": res["choice"], "breakeven_tokens": res["breakeven_tokens"]}
        print(f"# --fabric {'auto' if spec == 'auto' else 'FILE'}: {res['sources']['fabric']}")
        print(f"#   asked load: speedup {res['point']['speedup']:.3f}, break-even {res['breakeven_tokens']}")
    auto = runs["auto"]["fabric_choice"]
    preset = F.preset(kind, 2) if kind else None
    compare = {}
    for k, v in measured["values"].items():
        if not measured["provenance"][k].startswith("measured"):
            continue
        ref = getattr(preset, k) if preset else None
        compare[k] = {"measured": v, "preset": ref, "measured_over_preset": (v / ref) if ref else None}
        print(f"# {k:24s} measured {v:.4g}, preset {kind or '-'} {'-' if ref is None else f'{ref:.4g}'}"
              + (f" ({v / ref:.3f}x)" if ref else ""))
    checks = {"device_name_seen": auto["device_name"] == name, "preset_of_this_gpu": kind,
              "auto_uses_this_kind": (kind is not None and runs["auto"]["fabric"]["name"].startswith(kind)
                                      and not auto["borrowed"]) or (kind is None and auto["borrowed"]),
              "file_basis": runs["file"]["fabric_choice"]["basis"] == "file"}
    print(f"# checks: {checks}")
    return {"schema": "dwdp-bench/advise-validation/fabric/v1", "meta": _meta(), "gpu": name, "preset": kind,
            "measured_fabric": measured, "measured_vs_preset": compare, "runs": runs, "checks": checks}


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
    ints = lambda s: [int(v) for v in s.split(",") if v.strip()]  # noqa: E731
    h = sub.add_parser("hot", help="the hot-expert answer on generated histograms (CPU)")
    h.add_argument("--model", default="deepseek-v3")
    h.add_argument("-g", "--group-size", type=int, default=4)
    h.add_argument("--weights", default="bf16", choices=["bf16", "fp8"])
    h.add_argument("--fabric", default="h200")
    h.add_argument("--tokens", type=ints, default=[1024, 2048, 4096, 8192, 16384])
    h.add_argument("--cv", type=float, default=0.2)
    h.add_argument("--zipf", type=lambda s: [float(v) for v in s.split(",")], default=[0.8, 0.0],
                   help="Zipf exponents of the histograms (0: flat)")
    h.add_argument("--layers", type=int, default=3, help="MoE layers in the histogram, each its own hot set")
    h.add_argument("--hist-tokens", type=int, default=65536, help="tokens the histogram counts")
    h.add_argument("--json")
    f = sub.add_parser("fabric", help="one GPU: calibrate --write, then advise --fabric auto and --fabric FILE")
    f.add_argument("--model", default="deepseek-v3")
    f.add_argument("-g", "--group-size", type=int, default=4)
    f.add_argument("--weights", default="bf16", choices=["bf16", "fp8"])
    f.add_argument("--tokens", type=int, default=8192)
    f.add_argument("--cv", type=float, default=0.2)
    f.add_argument("--sweep", type=ints, default=[4096, 8192, 16384], help="tokens per rank of the curve")
    f.add_argument("--bytes", type=int, default=1 << 30, help="bytes of each whole copy of the measurement")
    f.add_argument("--fabric-file", help="where to keep the measured fabric file (default: a temporary file)")
    f.add_argument("--json")
    args = ap.parse_args(argv)
    doc = {"copy-plane": copy_plane, "compute": compute, "hot": hot, "fabric": fabric}[args.what](args)
    _write(args, doc)
    if args.json:
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Quantized routed experts (block-FP8, MXFP4) against the bf16 path and Hugging Face's own path, side by side.

Models (random weights of the real shapes, random top-k routing):
  deepseek  DeepSeek-V3: E=256, H=7168, I=2048, top-8, fp8_block (128 x 128 scales), SwiGLU
  gptoss    GPT-OSS-120B: E=128, H=2880, I=2880, top-4, mxfp4, GPT-OSS's gate (interleaved, clamp 7.0,
            alpha 1.702, (up + 1) * glu) and biases, as transformers' GptOssExperts
Variants, per model and token count (128, 1K, 4K, 16K):
  ours        experts_forward on the quantized weights, one tensor per projection (local weights)
  ours_split  the same weights as DWDP hands them out: 4 owners' pieces in 4 backend buffers
              (dwdp_comm.bench.split_weights on a one-rank group; scales whole, as a gather slot)
  bf16        (a) experts_forward on the dequantized bf16 weights (the path without quantization)
  hf          (b) Hugging Face's quantized experts path where it runs offline: fp8: transformers'
              finegrained-fp8 grouped experts forward (needs the hub `kernels` package in recent
              transformers: then it is reported as not running); mxfp4: what HF runs offline, the
              weights dequantized to bf16 and its grouped_mm experts forward on GptOssExperts
  mxfp4: ours_triton / ours_dequant force the Triton kernel / the dequantize path (the rule's data)
  fp8_block: ours_triton / ours_cublas force the Triton kernel / the cuBLAS per-expert path (where it runs)
Correctness first: every variant against the per-expert reference on the dequantized weights
(relative Frobenius error; fp8 variants quantize activations per 1 x 128, about 2-4 % by itself, so
their bound is 6e-2, the others' 2e-2) and, at the first size, ours against the reference that
quantizes activations as the kernels do (bound 2e-2). A variant that fails is reported, not timed.
Timing: dwdp_comm.bench.timing.Timer (sustained blocks, random order per round, ratios within a
round). Ratio = t_baseline / t_ours (> 1: ours faster). Then each Triton kernel's candidate tile
configurations are timed on the gate-up GEMM (dwdp_comm.kernels.triton_quant.CANDIDATES) and the
winner printed: the data for choose_config's rule.
Usage (repository root): python3 -m perf.bench_quant_experts [--quick] [--json FILE]
  (as a script, dwdp_comm must be importable: pip install -e . or PYTHONPATH=.)
One H100 (80 GB), about 2.5 minutes (2 rounds of 25 ms blocks; tile sweeps at 128, 4K, 16K); --quick: 1024 tokens only, fewer rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import sys
import traceback

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
import torch  # noqa: E402

from dwdp_comm import moe  # noqa: E402
from dwdp_comm.bench import record  # noqa: E402
from dwdp_comm.bench.split_weights import SplitWeights, single_rank_group  # noqa: E402
from dwdp_comm.bench.timing import Timer, rel_err, summarize_times  # noqa: E402
from dwdp_comm.kernels import quant as Q  # noqa: E402
from dwdp_comm.kernels import cublas_fp8, quant_gemm, triton_quant  # noqa: E402

OWNERS = 4
MODELS = {"deepseek": dict(E=256, H=7168, I=2048, k=8, fmt="fp8_block"),
          "gptoss": dict(E=128, H=2880, I=2880, k=4, fmt="mxfp4")}
SMOKE = {"deepseek": dict(E=16, H=256, I=128, k=4, fmt="fp8_block"),
         "gptoss": dict(E=8, H=192, I=192, k=2, fmt="mxfp4")}
TOL_FP8, TOL = 6e-2, 2e-2


def log(*a) -> None:
    print(*a, flush=True)


def gptoss_gate(h: torch.Tensor, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """GPT-OSS's gate (transformers' GptOssExperts._apply_gate): gate / up interleaved, clamped."""
    g, u = h[:, 0::2].clamp(max=limit), h[:, 1::2].clamp(-limit, limit)
    return (u + 1) * (g * torch.sigmoid(g * alpha))


def random_quantized(e: int, n: int, k: int, fmt: str, device, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """Random weights straight in the format (no float32 copy of the whole tensor), values ~ 1/sqrt(k)."""
    if fmt == "fp8_block":
        q = torch.empty(e, n, k, dtype=Q.FP8_DTYPE, device=device)
        for a in range(0, e, 16):
            q[a:a + 16] = (torch.randn(min(16, e - a), n, k, device=device, generator=gen) * 64).to(Q.FP8_DTYPE)
        s = torch.full((e, -(-n // 128), -(-k // 128)), 1.0 / 64 / math.sqrt(k), device=device)
        s *= 1 + 0.1 * torch.rand(s.shape, device=device, generator=gen)
        return q, s
    q = torch.randint(0, 256, (e, n, k // 2), dtype=torch.uint8, device=device, generator=gen)
    exp = round(math.log2(1 / math.sqrt(k) / 2.5))  # e2m1 values average ~2.5 in magnitude
    s = torch.randint(127 + exp - 1, 127 + exp + 1, (e, n, k // 32), dtype=torch.uint8, device=device, generator=gen)
    return q, s


def routing(t: int, e: int, k: int, device, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)
    val, idx = torch.randn(t, e, device=device, generator=g).topk(k, dim=-1)
    return idx, torch.softmax(val, dim=-1)


def hf_fp8(gu, s1, dn, s2, E):
    """(b) for fp8_block: transformers' finegrained-fp8 experts forward, or (None, why it does not run)."""
    try:
        from transformers.integrations import finegrained_fp8 as f
    except Exception as exc:
        return None, f"transformers.integrations.finegrained_fp8 not importable: {type(exc).__name__}: {exc}"
    if hasattr(f, "fp8_grouped_mm_experts_forward"):
        loader = getattr(f, "load_finegrained_fp8_kernel", None)
        if loader is not None:
            try:
                loader()
            except Exception as exc:
                return None, f"finegrained-fp8 kernel does not load offline ({type(exc).__name__}: {str(exc)[:160]})"
        ns = type("FP8ExpertsLike", (), {})()
        ns.activation_scheme, ns.num_experts, ns.has_gate, ns.block_size = "dynamic", E, True, (128, 128)
        ns.gate_up_proj, ns.gate_up_proj_scale_inv, ns.down_proj, ns.down_proj_scale_inv = gu, s1, dn, s2
        ns._is_expert_parallel, ns.act_fn = False, torch.nn.functional.silu
        ns._apply_gate = lambda h: torch.nn.functional.silu(h[..., :h.shape[-1] // 2]) * h[..., h.shape[-1] // 2:]
        return (lambda x, idx, w: f.fp8_grouped_mm_experts_forward(ns, x, idx, w)), None
    if hasattr(f, "w8a8_block_fp8_matmul_triton") and hasattr(f, "act_quant"):
        def loop(x, idx, w):  # HF's eager FP8 expert loop with its Triton block-FP8 matmul
            out = torch.zeros_like(x, dtype=torch.float32)
            for e in torch.unique(idx).tolist():
                if e >= E:
                    continue
                tok, slot = torch.nonzero(idx == e, as_tuple=True)
                xe = x[tok].contiguous()
                q, s = f.act_quant(xe, 128)
                h = f.w8a8_block_fp8_matmul_triton(q, gu[e], s, s1[e], [128, 128], output_dtype=x.dtype)
                a = torch.nn.functional.silu(h[:, :h.shape[1] // 2]) * h[:, h.shape[1] // 2:]
                q, s = f.act_quant(a.contiguous(), 128)
                y = f.w8a8_block_fp8_matmul_triton(q, dn[e], s, s2[e], [128, 128], output_dtype=x.dtype)
                out.index_add_(0, tok, (y * w[tok, slot, None]).float())
            return out.to(x.dtype)
        return loop, None
    return None, "this transformers has no finegrained-fp8 experts forward"


def hf_mxfp4(gu_bf16, dn_bf16, b1, b2, cfg):
    """(b) for mxfp4: HF offline dequantizes MXFP4 to bf16 and runs its grouped_mm experts forward."""
    try:
        import transformers
        from transformers.integrations import moe as hfmoe
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    except Exception as exc:
        return None, None, f"transformers GptOssExperts not importable: {type(exc).__name__}: {exc}"
    c = transformers.GptOssConfig(hidden_size=cfg["H"], intermediate_size=cfg["I"], num_local_experts=cfg["E"],
                                  num_experts_per_tok=cfg["k"])
    c._experts_implementation = "grouped_mm"
    with torch.device("meta"):
        m = GptOssExperts(c)
    m.gate_up_proj = torch.nn.Parameter(gu_bf16.transpose(1, 2), requires_grad=False)  # HF stores [E, H, 2I]
    m.down_proj = torch.nn.Parameter(dn_bf16.transpose(1, 2), requires_grad=False)
    m.gate_up_proj_bias = torch.nn.Parameter(b1, requires_grad=False)
    m.down_proj_bias = torch.nn.Parameter(b2, requires_grad=False)
    return (lambda x, idx, w: hfmoe.grouped_mm_experts_forward(m, x, idx, w.to(x.dtype))), m, None


@contextlib.contextmanager
def forced_path(path: str):
    """The rule's thresholds pinned so that ``path`` runs: mxfp4 ``triton`` / ``dequantize``, fp8_block
    ``triton`` / ``cublas``."""
    old = quant_gemm.MXFP4_DEQUANT_MIN_ROWS, quant_gemm.FP8_CUBLAS_MIN_ROWS
    quant_gemm.MXFP4_DEQUANT_MIN_ROWS = 0 if path == "dequantize" else float("inf")
    quant_gemm.FP8_CUBLAS_MIN_ROWS = 0 if path == "cublas" else float("inf")
    try:
        yield
    finally:
        quant_gemm.MXFP4_DEQUANT_MIN_ROWS, quant_gemm.FP8_CUBLAS_MIN_ROWS = old


def time_configs(name, cfg, qw, qs, x, idx, timer, rounds, rows) -> None:
    """Every candidate tile configuration of the format's kernel on the gate-up GEMM of this batch."""
    E, fmt = cfg["E"], cfg["fmt"]
    order = moe.sort_by_expert(idx, E)
    offs = order.offsets
    xs = moe.gather_tokens(x, order)
    kind = "fp8_block" if fmt == "fp8_block" else "mxfp4"
    cands = {c.name: c for cs in triton_quant.CANDIDATES[kind].values() for c in cs}
    chosen = triton_quant.choose_config(kind, xs.shape[0] / E, qw.shape[1], cfg["H"])
    if kind == "fp8_block":
        xq, xsc = triton_quant.quantize_act(xs, 128)
        fns = {n: (lambda c=c: triton_quant.fp8_block_gemm(xq, xsc, [(0, qw)], qs, offs, config=c))
               for n, c in cands.items()}
    else:
        fns = {n: (lambda c=c: triton_quant.mxfp4_gemm(xs, [(0, qw)], qs, offs, config=c)) for n, c in cands.items()}
    ok = {}
    for n, fn in fns.items():
        try:
            fn()
            ok[n] = fn
        except Exception as exc:
            log(f"#   config {n} FAILED: {type(exc).__name__}: {str(exc)[:200]}")
    times = timer.rounds(ok, rounds)
    res = summarize_times(times, chosen.name if chosen.name in times else next(iter(times)), 0, {}, "configs")
    best = min(res, key=lambda r: r["ms"])
    line = "  ".join(f"{r['variant']}={r['ms']:.3f}ms" for r in sorted(res, key=lambda r: r["ms"]))
    log(f"configs {name:8s} T={x.shape[0]:6d} {kind} gate-up: winner {best['variant']} "
        f"(rule picks {chosen.name}, {best['ms'] / next(r['ms'] for r in res if r['variant'] == chosen.name):.3f}x "
        f"its time)  {line}" if chosen.name in times else f"configs {name} T={x.shape[0]}: {line}")
    rows.extend(dict(r, model=name, tokens=int(x.shape[0]), kind=kind, rule=chosen.name) for r in res)


def run_model(name, cfg, sizes, args, device, timer, group, rows, checks, configs, notes, profiles) -> None:
    E, H, I, k, fmt = cfg["E"], cfg["H"], cfg["I"], cfg["k"], cfg["fmt"]
    gen = torch.Generator(device=device).manual_seed(args.seed)
    log(f"\n# {name}: E={E} H={H} I={I} top-{k} {fmt}; building weights ...")
    gu, s1 = random_quantized(E, 2 * I, H, fmt, device, gen)
    dn, s2 = random_quantized(E, H, I, fmt, device, gen)
    gu_b, dn_b = Q.dequantize(gu, s1, fmt), Q.dequantize(dn, s2, fmt)  # (a)'s weights, and the reference's
    extra = {}
    if name == "gptoss":
        extra = dict(gate=gptoss_gate, gate_up_bias=torch.randn(E, 2 * I, device=device, generator=gen) * 0.01,
                     down_bias=torch.randn(E, H, device=device, generator=gen) * 0.01)
    quant_args = dict(gate_up_scale=s1, down_scale=s2, weight_format=fmt, **extra)
    if fmt == "fp8_block":
        hf_fn, why = hf_fp8(gu, s1, dn, s2, E)
        hf_mod = None
    else:
        hf_fn, hf_mod, why = hf_mxfp4(gu_b, dn_b, extra["gate_up_bias"], extra["down_bias"], cfg)
    if hf_fn is None:
        notes.append(f"{name}: (b) HF's quantized path does not run here: {why}")
        log(f"# (b) hf: not run: {why}")
    split = None
    for t in sizes:
        x = torch.randn(t, H, device=device, generator=gen).bfloat16()
        idx, w = routing(t, E, k, device, args.seed + t)
        fns = {"ours": lambda: moe.experts_forward(x, idx, w, gu, dn, **quant_args),
               "bf16": lambda: moe.experts_forward(x, idx, w, gu_b, dn_b, **extra)}
        def forced(path):
            def fn():
                with forced_path(path):
                    return moe.experts_forward(x, idx, w, gu, dn, **quant_args)
            return fn
        if fmt == "mxfp4":
            fns["ours_triton"], fns["ours_dequant"] = forced("triton"), forced("dequantize")
        elif cublas_fp8.unavailable_reason(device, 2 * I, H) is None:
            fns["ours_triton"], fns["ours_cublas"] = forced("triton"), forced("cublas")
        if hf_fn is not None:
            fns["hf"] = lambda: hf_fn(x, idx, w)
        native = quant_gemm.native_unavailable_reason(fmt, device) is None
        if t == sizes[0]:  # strict check: the reference quantizes activations as the kernels do
            try:
                strict = moe.experts_forward_reference(x, idx, w, gu, dn, quantize_activations=native, **quant_args)
                err = rel_err(fns["ours"](), strict)
                checks.append(dict(model=name, tokens=t, variant="ours_vs_kernel_numerics", rel_err=err, ok=err < TOL))
                log(f"check {name:8s} T={t:6d} {'ours (act-quantized ref)':26s} rel_err={err:.2e} "
                    f"{'ok' if err < TOL else 'WRONG'}")
                strict = None
            except torch.cuda.OutOfMemoryError as exc:
                log(f"# strict check skipped: out of memory ({exc})")
            torch.cuda.empty_cache() if device.type == "cuda" else None
            if group is not None and split is None:
                cuts = [round(i * E / OWNERS) for i in range(OWNERS + 1)]
                try:
                    split = [SplitWeights(group, gu, cuts), SplitWeights(group, dn, cuts)]
                except Exception as exc:
                    notes.append(f"{name}: ours_split not run: {type(exc).__name__}: {exc}")
        if split is not None:
            fns["ours_split"] = lambda: moe.experts_forward(x, idx, w, split[0].segments, split[1].segments,
                                                            **quant_args)
        ref = moe.experts_forward_reference(x, idx, w, gu_b, dn_b, **extra)
        good = {}
        for v, fn in fns.items():
            try:
                info = {}
                out = moe.experts_forward(x, idx, w, gu, dn, info=info, **quant_args) if v == "ours" else fn()
                err = rel_err(out, ref)
            except Exception as exc:
                err, info = math.inf, {"error": f"{type(exc).__name__}: {exc}"}
                log(f"# {name} T={t} {v} FAILED {type(exc).__name__}: {exc}")
                traceback.print_exc()
            bound = TOL_FP8 if fmt == "fp8_block" and (v.startswith("ours") or v == "hf") else TOL
            checks.append(dict(model=name, tokens=t, variant=v, rel_err=err, ok=err < bound, bound=bound))
            log(f"check {name:8s} T={t:6d} {v:26s} rel_err={err:.2e} (bound {bound:g}) "
                f"{'ok' if err < bound else 'WRONG'}" + (f"  [{info.get('gemm')}; {info.get('fallback', '')}]"
                                                         if v == "ours" else ""))
            if err < bound:
                good[v] = fn
        ref = None
        if "ours" not in good:
            continue
        times = timer.rounds(good, args.rounds)
        flops = 2 * t * k * (H * 2 * I + I * H)
        res = summarize_times(times, "ours", flops, dict(model=name, tokens=t, fmt=fmt), "experts", timer.calls)
        for r in res:
            r["speedup_of_ours"] = 1 / r["ratio"] if r["ratio"] else math.nan  # t_variant / t_ours
        rows.extend(res)
        log(f"{name:8s} T={t:6d} " + "  ".join(f"{r['variant']}={r['ms']:.3f}ms" for r in res))
        if t in args.profile_tokens:
            kernel_breakdown(name, t, {v: good[v] for v in ("ours", "bf16") if v in good}, profiles, device)
        if t in args.config_tokens and not args.no_configs and device.type == "cuda":
            try:
                time_configs(name, cfg, gu, s1, x, idx, timer, args.rounds, configs)
            except Exception as exc:
                log(f"# configs {name} T={t} FAILED: {type(exc).__name__}: {exc}")
    for s in split or []:
        s.close()
    # the weights (tens of GB) go when this frame does: the caller collects and empties the cache


def kernel_breakdown(name, t, fns, profiles, device, calls: int = 3) -> None:
    """GPU time per call of each kernel of ``fns`` (torch.profiler, ``calls`` calls a variant): where the
    time goes, the GEMMs against the rest. On CPU (the smoke run): self CPU time per op instead."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    for v, fn in fns.items():
        fn()
        torch.cuda.synchronize() if cuda else None
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize() if cuda else None
        per = {}
        for ev in prof.key_averages():
            us = (getattr(ev, "device_time_total", 0) or getattr(ev, "cuda_time_total", 0)) if cuda else \
                ev.self_cpu_time_total
            if us and ev.key and (not cuda or not ev.key.startswith(("ProfilerStep", "aten::", "cuda"))):
                per[ev.key] = per.get(ev.key, 0.0) + us / 1e3 / calls
        top = sorted(per.items(), key=lambda kv: -kv[1])[:8]
        profiles.append(dict(model=name, tokens=t, variant=v, kernels_ms=dict(top), total_ms=sum(per.values())))
        log(f"profile {name:8s} T={t:6d} {v:5s} total {sum(per.values()):.3f} ms/call: "
            + "  ".join(f"{k[:48]}={ms:.3f}" for k, ms in top))


def table(rows, notes) -> None:
    cols = ("bf16", "hf", "ours_split", "ours_triton", "ours_dequant", "ours_cublas")
    log("\n# every column: t_variant / t_ours (median of the per-round ratios; > 1: ours, on local weights, is "
        "faster). bf16 = (a), hf = (b); ours_split: the same quantized path on DWDP's split pieces; "
        "ours_triton / ours_dequant / ours_cublas: forced onto one path (the rule's data)")
    log(f"{'model':9s} {'tokens':>7s} {'ours ms':>9s} " + " ".join(f"{c:>13s}" for c in cols))
    for m in MODELS:
        for t in sorted({r["tokens"] for r in rows if r.get("model") == m}):
            rr = {r["variant"]: r for r in rows if r.get("model") == m and r["tokens"] == t}
            cells = []
            for c in cols:
                cells.append(f"{rr[c]['speedup_of_ours']:12.3f}x" if c in rr else f"{'-':>13s}")
            log(f"{m:9s} {t:7d} {rr['ours']['ms']:9.3f} " + " ".join(cells))
    for n in notes:
        log(f"# note: {n}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="128,1024,4096,16384")
    ap.add_argument("--models", default="deepseek,gptoss")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--block-ms", type=float, default=25.0)
    ap.add_argument("--config-tokens", default="128,4096,16384", help="sizes whose tile configurations are timed")
    ap.add_argument("--no-configs", action="store_true")
    ap.add_argument("--profile-tokens", default="", help="sizes whose kernels are listed (torch.profiler): ours, bf16")
    ap.add_argument("--quick", action="store_true", help="1024 tokens only, 2 rounds (a smoke run)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--json", default=None, help="result file (default $OUT/quant_experts.json when $OUT is set)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        args.tokens, args.rounds, args.config_tokens = "1024", 2, "1024"
    smoke = device.type != "cuda"
    if smoke:  # CPU: tiny shapes, to check the script itself
        args.tokens, args.rounds, args.block_ms, args.no_configs, args.profile_tokens = "24", 1, 2.0, True, "24"
    sizes = [int(v) for v in args.tokens.split(",")]
    args.config_tokens = [int(v) for v in str(args.config_tokens).split(",")]
    args.profile_tokens = [int(v) for v in str(args.profile_tokens).split(",") if v]
    info = record.env_info(device, modules=("transformers", "triton"))
    log(f"# bench_quant_experts {info['date']} gpu={info.get('gpu')} torch={info['torch']} "
        f"transformers={info.get('transformers')} triton={info.get('triton')} commit={info['git']['commit'][:12]}"
        + (" (CPU smoke run: tiny shapes)" if smoke else ""))
    for fmt in ("fp8_block", "mxfp4"):
        why = quant_gemm.native_unavailable_reason(fmt, device)
        log(f"# {fmt} Triton kernel: " + (f"NOT available ({why}): 'ours' runs the dequantize path" if why
                                            else "available"))
    timer = Timer(device, block_ms=args.block_ms, warmup_ms=200.0)
    rows, checks, configs, notes, profiles = [], [], [], [], []
    stack = contextlib.ExitStack()
    try:
        group = stack.enter_context(single_rank_group("cuda_ipc" if device.type == "cuda" else "sim"))
    except Exception as exc:
        group = None
        notes.append(f"no one-rank group ({type(exc).__name__}: {exc}): ours_split not run")
    try:
        for name in args.models.split(","):
            run_model(name, (SMOKE if smoke else MODELS)[name], sizes, args, device, timer, group, rows, checks,
                      configs, notes, profiles)
            gc.collect()  # free one model's weights before the next is built
            torch.cuda.empty_cache() if device.type == "cuda" else None
    finally:
        stack.close()
    table(rows, notes)
    bad = [c for c in checks if not c["ok"] and c["variant"] != "hf"]  # (b) failing is reported, not ours
    for c in (c for c in checks if not c["ok"]):
        log(f"# {'WRONG' if c in bad else 'baseline (b) not usable'}: {c['model']} T={c['tokens']} {c['variant']}: "
            f"relative error {c['rel_err']:.3e} above {c.get('bound', TOL)} (not timed)")
    result = dict(env=info, args=vars(args), method="dwdp_comm.bench.timing.Timer: sustained blocks, random order "
                  "per round, ratio within a round, median over rounds", results=rows, configs=configs,
                  profiles=profiles, checks=checks, notes=notes, mxfp4_dequant_min_rows=quant_gemm.MXFP4_DEQUANT_MIN_ROWS)
    path = record.write_json(record.result_path(args.json, "quant_experts.json"), result)
    if path:
        log(f"# wrote {path}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Grouped GEMM over split expert weights: correctness, then the speed of every variant against
``torch._grouped_mm`` measured in the same rounds.

DeepSeek-V3 shapes, 256 routed experts, tokens x top-8 routed with an uneven (lognormal expert
popularity, Gumbel top-k) spread:
  gate_up  K=7168 N=4096   (w13: [256, 7168, 4096])
  down     K=2048 N=7168   (w2:  [256, 2048, 7168])
Split layout: a DWDP rank of a group of 4 (rank 1): 4 owner shards of 64 experts, the local one
[64, 128) and the three prefetched ones, each in its own physical allocation, made by the library's
backend as the prefetcher's slots are (dwdp_comm.bench.split_weights on a one-rank group: cuda_ipc
VMM on a GPU, sim on CPU; plain torch clones where that cannot run). The composite view maps the 4
allocations back to back: one tensor.

Variants (bf16 unless said):
  raw_grouped_mm        torch._grouped_mm(x, w, offs=offs) on one contiguous [E, K, N] tensor: the baseline
  raw_grouped_mm_again  the very same call, timed as a separate variant: the noise floor of every ratio
  contiguous            dwdp_comm.kernels.grouped_gemm on that tensor, TokenGroups built beforehand
  contiguous_host_sizes the same with the counts as a Python list each call (host validation plus one
                        asynchronous upload of the offsets per call)
  composite             grouped_gemm on the composite view (VMM on a GPU)
  split                 grouped_gemm on the 4 pieces, backend "torch" (auto: segments_direct on CUDA:
                        piece 0 in place, experts with >= direct_min_rows (default 128) rows
                        torch.mm into the output rows, smaller ones grouped into temporaries + copies, on worker streams)
  split_async           method "segments_async" (each piece one grouped call, results copied, on
                        worker streams: the default before segments_direct)
  split_serial          method "segments" (as split_async, in order on the current stream)
  split_per_expert      method "per_expert" (torch.mm per expert; only with --per-expert)
  fp8_contiguous        torch._scaled_grouped_mm, e4m3 weights + per-channel scales, x quantized per
                        row beforehand (where available)
  fp8_split             the same over the 4 pieces (auto: whole pieces on worker streams, as
                        segments_async: no direct units for fp8)
  fp8_with_quant        fp8_contiguous from bf16 x: includes the per-row quantization of x
Host section (tiny shapes): host microseconds per call of each way of calling, and whether the call
synchronises with the device (torch.cuda.set_sync_debug_mode("error")).
Numba section (down shape, --numba-tokens): the Numba kernel (float32 and bf16) against torch
float32 (TF32 off: torch._grouped_mm where it takes float32, and per-expert torch.mm).

Correctness: every variant against the float64 reference at the first token count and against the
raw baseline's output at every token count; a wrong result makes the exit status non-zero.

Timing method: sustained blocks. Each variant runs a block of back-to-back calls lasting about
--block-ms (no sync, sleep or L2 flush inside: the GPU stays at its power-capped steady state, as in
inference), after --lead of that many untimed calls of itself (so the previous variant's power
state does not carry over); a round runs one block of every variant, in a fresh random order each
round (so no variant always follows the same neighbour), after untimed warm-up rounds. CUDA events bracket each block; time per call = block / calls.
Ratio = t_raw / t_variant computed within each round (clock drift cancels), then the median over
rounds (p10-p90 given); ratio >= 1 means as fast as raw. Times are medians over rounds.

Usage:
  CUDA_VISIBLE_DEVICES=0 python3 -m perf.bench_grouped_gemm --json FILE   # full run, ~2 min on an H200
  python3 -m perf.bench_grouped_gemm --smoke                              # tiny shapes; runs on CPU too
  OUT=/some/dir python3 -m perf.bench_grouped_gemm                        # writes $OUT/grouped_gemm.json
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
import traceback

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # big, varying outputs
import torch  # noqa: E402

import dwdp_comm.kernels as K  # noqa: E402
from dwdp_comm.bench import record  # noqa: E402
from dwdp_comm.bench.split_weights import SplitWeights, single_rank_group  # noqa: E402
from dwdp_comm.bench.timing import Timer, rel_err, summarize_times  # noqa: E402
from dwdp_comm.bench.workload import DEEPSEEK_V3_SHAPES, routed_counts  # noqa: E402
from dwdp_comm.kernels import capabilities, reference  # noqa: E402

SHAPES = DEEPSEEK_V3_SHAPES
SMOKE_SHAPES = {"gate_up": (64, 96), "down": (48, 64)}
OWNERS = 4  # group size: pieces of the split layout
TARGETS = {"split": 0.97, "composite": 0.99}  # issue 5: split / raw >= 0.97, composite / raw >= 0.99
NOISE = "raw_grouped_mm_again"


def log(*a) -> None:
    print(*a, flush=True)


# ---- split weights and composite views -----------------------------------------------------------
def plain_split(w: torch.Tensor, cuts: list[int]) -> list[tuple[int, torch.Tensor]]:
    """Fallback split: each piece cloned into its own torch allocation."""
    return [(a, w[a:b].clone()) for a, b in zip(cuts[:-1], cuts[1:])]


def open_group(stack: contextlib.ExitStack, device: torch.device, unavailable: dict):
    """The one-rank group whose backend makes the pieces and their composite view (cuda_ipc on a
    GPU: VMM, as the prefetcher's slots; sim on CPU), or None (then cloned pieces, no composite)."""
    backend = "cuda_ipc" if device.type == "cuda" else "sim"
    try:
        return stack.enter_context(single_rank_group(backend))
    except Exception as exc:
        unavailable.setdefault("composite", f"no one-rank {backend} group: {type(exc).__name__}: {exc}")
        return None


def split_views(group, w: torch.Tensor, cuts: list[int], unavailable: dict):
    """``(segments, composite or None, SplitWeights or None)`` of ``w`` cut at ``cuts``."""
    if group is None:
        return plain_split(w, cuts), None, None
    try:
        sw = SplitWeights(group, w, cuts)
    except Exception as exc:
        unavailable.setdefault("composite", f"{type(exc).__name__}: {exc}")
        return plain_split(w, cuts), None, None
    if sw.composite is None:
        unavailable.setdefault("composite", sw.why_not)
    return sw.segments, sw.composite, sw


# ---- helpers -------------------------------------------------------------------------------------
def fp8_weights(w: torch.Tensor, chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 copy of ``w`` [E, K, N] stored [E, N, K] (K-contiguous), and float32 scales [E, N]."""
    E, Kd, N = w.shape
    q = torch.empty(E, N, Kd, dtype=torch.float8_e4m3fn, device=w.device)
    s = torch.empty(E, N, dtype=torch.float32, device=w.device)
    for a in range(0, E, chunk):
        wt = w[a:a + chunk].transpose(1, 2).float()
        sc = (wt.abs().amax(dim=2) / reference.FP8_MAX).clamp_(min=1e-12)
        q[a:a + chunk] = (wt / sc[:, :, None]).to(torch.float8_e4m3fn)
        s[a:a + chunk] = sc
    return q.transpose(1, 2), s


# ---- the bf16 / fp8 section ----------------------------------------------------------------------
def bench_shape(name, Kd, N, args, device, timer, seed, rows_out, checks, unavailable, group):
    E = args.experts
    t_shape = time.perf_counter()
    log(f"\n# shape {name}: E={E} K={Kd} N={N}; building weights ...")
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(E, Kd, N, generator=g, device=device, dtype=torch.bfloat16).div_(math.sqrt(Kd))
    q = E // OWNERS
    cuts = [i * q for i in range(OWNERS)] + [E] if E >= OWNERS else [0, E]
    split, composite, vm = split_views(group, w, cuts, unavailable)
    wq = sq = None
    why8 = capabilities.fp8_unavailable_reason(device)
    if why8:
        unavailable.setdefault("fp8", why8)
    elif not args.no_fp8:
        wq, sq = fp8_weights(w)
    log(f"  pieces (first expert, count): {[(a, b - a) for a, b in zip(cuts[:-1], cuts[1:])]}"
        f"; composite: {'yes (' + group.backend + ')' if composite is not None else 'no'}; fp8: {'yes' if wq is not None else 'no'}")
    for ti, tokens in enumerate(args.tokens):
        try:
            bench_size(name, Kd, N, tokens, ti == 0, args, device, timer, seed, g, w, cuts, split, composite,
                       wq, sq, rows_out, checks)
        except Exception as exc:  # e.g. out of memory: record it, go on with the other sizes
            log(f"  tokens={tokens}: FAILED {type(exc).__name__}: {exc}")
            traceback.print_exc()
            checks.append(dict(shape=name, tokens=tokens, variant="(all)", rel_err=math.inf, tol=0, ok=False,
                               error=f"{type(exc).__name__}: {exc}"))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    split = composite = wq = sq = w = None
    if vm is not None:
        vm.close()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    log(f"  shape {name} done in {time.perf_counter() - t_shape:.1f} s")


def bench_size(name, Kd, N, tokens, first, args, device, timer, seed, g, w, cuts, split, composite, wq, sq,
               rows_out, checks):
    """Check, then time, every variant at one token count."""
    E = args.experts
    sizes, stats = routed_counts(tokens, E, args.top_k, seed + tokens)
    T = stats["rows"]
    groups = K.TokenGroups(sizes)
    offs = groups.device_offsets(device)
    x = torch.randn(T, Kd, generator=g, device=device, dtype=torch.bfloat16)
    variants = {
        "raw_grouped_mm": lambda: torch._grouped_mm(x, w, offs=offs),
        NOISE: lambda: torch._grouped_mm(x, w, offs=offs),
        "contiguous": lambda: K.grouped_gemm(x, groups, w, backend="torch"),
        "contiguous_host_sizes": lambda: K.grouped_gemm(x, sizes, w, backend="torch"),
    }
    if composite is not None:
        variants["composite"] = lambda: K.grouped_gemm(x, groups, composite, backend="torch")
    variants["split"] = lambda: K.grouped_gemm(x, groups, split, backend="torch")
    variants["split_async"] = lambda: K.grouped_gemm(x, groups, split, backend="torch:segments_async")
    variants["split_serial"] = lambda: K.grouped_gemm(x, groups, split, backend="torch:segments")
    if args.per_expert:
        variants["split_per_expert"] = lambda: K.grouped_gemm(x, groups, split, backend="torch:per_expert")
    xq = xs = None
    if wq is not None:
        xq, xs = K.quantize_rowwise(x)
        wq_split = [(a, wq[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
        sq_split = [sq[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
        variants["fp8_contiguous"] = lambda: K.grouped_gemm(xq, groups, wq, weight_scales=sq, x_scales=xs,
                                                            backend="torch")
        variants["fp8_split"] = lambda: K.grouped_gemm(xq, groups, wq_split, weight_scales=sq_split, x_scales=xs,
                                                       backend="torch")
        variants["fp8_with_quant"] = lambda: K.grouped_gemm(x, groups, wq, weight_scales=sq, backend="torch")
    info = {}
    K.grouped_gemm(x, groups, split, backend="torch", info=info)
    log(f"  tokens={tokens} rows={T} (max/mean {stats['max_over_mean']:.2f}, min/mean "
        f"{stats['min_over_mean']:.2f}, cv {stats['cv']:.2f}, empty {stats['empty']}; split ran "
        f"{info.get('method')}): checking ...")
    # Correctness: bf16 variants against the raw baseline, fp8 ones against fp8_contiguous; the
    # baseline and fp8_contiguous against the float64 reference at the first token count. A variant
    # that raises is reported (check failed) and left out of the timing.
    errs, failed = {}, {}

    def check(k, fn, ref):
        try:
            errs[k] = rel_err(fn(), ref)
        except Exception as exc:
            failed[k] = f"{type(exc).__name__}: {str(exc)[:300]}"

    base = variants["raw_grouped_mm"]()
    if first:
        check("raw_grouped_mm", lambda: base, reference.run(K.make_problem(x, groups, w)))
    for k, fn in variants.items():
        if k != "raw_grouped_mm" and not k.startswith("fp8"):
            check(k, fn, base)
    if wq is not None:
        try:
            f8 = variants["fp8_contiguous"]()
        except Exception as exc:
            f8 = None
            failed.update({k: f"{type(exc).__name__}: {str(exc)[:300]}" for k in variants if k.startswith("fp8")})
        if f8 is not None:
            if first:
                check("fp8_contiguous", lambda: f8, reference.run(
                    K.make_problem(xq, groups, wq, weight_scales=sq, x_scales=xs)))
                errs["fp8_vs_bf16"] = rel_err(f8, base)  # quantization error: informative, no bound
            base = None
            for k in ("fp8_split", "fp8_with_quant"):
                check(k, variants[k], f8)
            f8 = None
    base = None
    for k, e in errs.items():
        tol = math.inf if k == "fp8_vs_bf16" else 1e-2
        checks.append(dict(shape=name, tokens=tokens, variant=k, rel_err=e, tol=tol, ok=bool(e < tol)))
    for k, why in failed.items():
        checks.append(dict(shape=name, tokens=tokens, variant=k, rel_err=math.inf, tol=1e-2, ok=False, error=why))
        variants.pop(k, None)
    bad = [k for k, e in errs.items() if not e < (math.inf if k == "fp8_vs_bf16" else 1e-2)] + list(failed)
    log("    checks: " + ", ".join(f"{k}={e:.2e}" for k, e in errs.items()) + (f"  WRONG: {bad}" if bad else ""))
    for k, why in failed.items():
        log(f"    {k} raised {why}")
    timer.sync()
    t0 = time.perf_counter()
    times = timer.rounds(variants, args.reps, args.warmup)
    flops = 2.0 * T * Kd * N
    common = dict(shape=name, K=Kd, N=N, experts=E, tokens=tokens, rows=T)
    rows = summarize_times(times, "raw_grouped_mm", flops, common, "bf16", timer.calls)
    for r in rows:
        r["vs_raw"] = r["ratio"]  # name kept from earlier result files
        if r["variant"] == "split":
            r["method"] = info.get("method")
    rows_out.extend(rows)
    log(f"    {len(variants)} variants x {args.reps} rounds in {time.perf_counter() - t0:.1f} s"
        f"  (ratio = t_raw / t_variant per round: median [p10, p90])")
    for r in rows:
        log(f"    {r['variant']:>22}: {r['ms']:9.3f} ms  {r['tflops']:7.1f} TFLOP/s  "
            f"x{r['ratio']:.3f} [{r['ratio_p10']:.3f}, {r['ratio_p90']:.3f}]")


# ---- host overhead and synchronisation -----------------------------------------------------------
def bench_host(args, device, rows_out, unavailable) -> list[dict]:
    """Host microseconds per call (back-to-back calls, tiny GEMMs) and whether each form syncs."""
    E = args.experts
    Kd = N = 128
    T = 8 * E
    g = torch.Generator(device="cpu").manual_seed(1)
    sizes = torch.multinomial(torch.ones(E), T, replacement=True, generator=g).bincount(minlength=E).tolist()
    x = torch.randn(T, Kd, device=device, dtype=torch.bfloat16)
    w = torch.randn(E, Kd, N, device=device, dtype=torch.bfloat16) / math.sqrt(Kd)
    q = E // OWNERS
    cuts = [i * q for i in range(OWNERS)] + [E] if E >= OWNERS else [0, E]
    split = plain_split(w, cuts)
    groups = K.TokenGroups(sizes)
    offs = groups.device_offsets(device)
    sizes_cpu = torch.tensor(sizes)
    sizes_dev = sizes_cpu.to(device)
    forms = {
        "raw torch._grouped_mm": lambda: torch._grouped_mm(x, w, offs=offs),
        "contiguous, TokenGroups reused": lambda: K.grouped_gemm(x, groups, w),
        "contiguous, list": lambda: K.grouped_gemm(x, sizes, w),
        "contiguous, CPU tensor": lambda: K.grouped_gemm(x, sizes_cpu, w),
        "contiguous, device tensor, validate=False": lambda: K.grouped_gemm(
            x, K.TokenGroups(sizes_dev, validate=False), w),
        "contiguous, device tensor (validated)": lambda: K.grouped_gemm(x, sizes_dev, w),
        f"split {len(split)} pieces, TokenGroups reused": lambda: K.grouped_gemm(x, groups, split),
        f"split {len(split)} pieces, list": lambda: K.grouped_gemm(x, sizes, split),
        f"split {len(split)} pieces, serial copies": lambda: K.grouped_gemm(x, groups, split, backend="torch:segments"),
    }
    calls = 20 if args.smoke else 200
    rows = []
    log(f"\n# host: {calls} back-to-back calls of tiny GEMMs (E={E} K={Kd} N={N} rows={T}); "
        "us = host microseconds per call; sync = does one call block on the device")
    for name, fn in forms.items():
        for _ in range(3):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        us = (time.perf_counter() - t0) / calls * 1e6
        if device.type == "cuda":
            torch.cuda.synchronize()
        syncs = None
        if device.type == "cuda":
            old = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            try:
                fn()
                syncs = False
            except RuntimeError:  # "called a synchronizing CUDA operation"
                syncs = True
            finally:
                torch.cuda.set_sync_debug_mode(old)
            torch.cuda.synchronize()
        rows.append(dict(form=name, host_us=us, syncs=syncs))
        log(f"    {name:>44}: {us:8.1f} us/call  sync: {'n/a (CPU)' if syncs is None else ('YES' if syncs else 'no')}")
    return rows


# ---- the MoE MLP section -------------------------------------------------------------------------
def bench_moe(args, device, timer, seed, rows_out, checks, unavailable, group):
    """moe_mlp (gate-up, SwiGLU, down) on contiguous, composite and split weights of both shapes."""
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    H, N13 = shapes["gate_up"]
    I2, H2 = shapes["down"]
    if I2 * 2 != N13 or H2 != H:
        raise ValueError(f"gate_up {shapes['gate_up']} and down {shapes['down']} do not make one MLP")
    E = args.experts
    log(f"\n# moe_mlp: E={E} H={H} I={I2} (w13 [E, H, 2I], w2 [E, I, H]); building weights ...")
    g = torch.Generator(device=device).manual_seed(seed + 3)
    w13 = torch.randn(E, H, N13, generator=g, device=device, dtype=torch.bfloat16).div_(math.sqrt(H))
    w2 = torch.randn(E, I2, H, generator=g, device=device, dtype=torch.bfloat16).div_(math.sqrt(I2))
    q = E // OWNERS
    cuts = [i * q for i in range(OWNERS)] + [E] if E >= OWNERS else [0, E]
    s13, c13, vm13 = split_views(group, w13, cuts, unavailable)
    s2, c2, vm2 = split_views(group, w2, cuts, unavailable)
    if c13 is None or c2 is None:
        c13 = c2 = None
    vms = [vm for vm in (vm13, vm2) if vm is not None]
    try:
        for tokens in args.moe_tokens:
            sizes, stats = routed_counts(tokens, E, args.top_k, seed + 11 + tokens)
            T = stats["rows"]
            groups = K.TokenGroups(sizes)
            x = torch.randn(T, H, generator=g, device=device, dtype=torch.bfloat16)
            v = {"moe_contiguous": lambda: K.moe_mlp(x, groups, w13, w2),
                 "moe_contiguous_again": lambda: K.moe_mlp(x, groups, w13, w2)}
            if c13 is not None:
                v["moe_composite"] = lambda: K.moe_mlp(x, groups, c13, c2)
            v["moe_split"] = lambda: K.moe_mlp(x, groups, s13, s2)
            v["moe_split_async"] = lambda: K.moe_mlp(x, groups, s13, s2, backend="torch:segments_async")
            v["moe_split_serial"] = lambda: K.moe_mlp(x, groups, s13, s2, backend="torch:segments")
            base = v["moe_contiguous"]()
            for k, fn in list(v.items())[1:]:
                e = rel_err(fn(), base)
                checks.append(dict(shape="moe", tokens=tokens, variant=k, rel_err=e, tol=1e-2, ok=bool(e < 1e-2)))
                if not e < 1e-2:
                    log(f"    {k}: WRONG rel err {e:.3g}")
                    v.pop(k)
            base = None
            timer.sync()
            times = timer.rounds(v, args.reps, args.warmup)
            flops = 2.0 * T * H * N13 + 2.0 * T * I2 * H
            common = dict(shape="moe", K=H, N=N13, experts=E, tokens=tokens, rows=T)
            rows = summarize_times(times, "moe_contiguous", flops, common, "moe", timer.calls)
            rows_out.extend(rows)
            log(f"  tokens={tokens} rows={T}:")
            for r in rows:
                log(f"    {r['variant']:>22}: {r['ms']:9.3f} ms  {r['tflops']:7.1f} TFLOP/s  "
                    f"x{r['ratio']:.3f} [{r['ratio_p10']:.3f}, {r['ratio_p90']:.3f}]")
            x = None
    finally:
        s13 = s2 = c13 = c2 = None
        for vm in vms:
            vm.close()
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ---- the Numba section ---------------------------------------------------------------------------
def bench_numba(args, device, timer, seed, rows_out, checks, unavailable):
    why = K.available_backends(device, reasons=True)["numba"]
    if why or args.no_numba:
        unavailable["numba"] = why or "--no-numba"
        log(f"\n# numba section skipped: {unavailable['numba']}")
        return
    name = "down"
    Kd, N = (SMOKE_SHAPES if args.smoke else SHAPES)[name]
    E = args.experts
    tokens = args.numba_tokens
    sizes, stats = routed_counts(tokens, E, args.top_k, seed + 7)
    T = stats["rows"]
    groups = K.TokenGroups(sizes)
    log(f"\n# numba: shape {name} E={E} K={Kd} N={N} tokens={tokens} rows={T}; building float32 weights ...")
    g = torch.Generator(device=device).manual_seed(seed + 1)
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        w32 = torch.randn(E, Kd, N, generator=g, device=device).div_(math.sqrt(Kd))
        x32 = torch.randn(T, Kd, generator=g, device=device)
        wbf, xbf = w32.bfloat16(), x32.bfloat16()
        q = E // 4
        split32 = [(0, w32[:q]), (q, w32[q:2 * q]), (2 * q, w32[2 * q:])] if E >= 4 else w32
        flops = 2.0 * T * Kd * N
        base32 = {"torch_fp32_per_expert": lambda: K.grouped_gemm(x32, groups, w32, backend="torch:per_expert")}
        if capabilities.grouped_mm_supported(device, torch.float32):
            base32["torch_fp32_grouped_mm"] = lambda: K.grouped_gemm(x32, groups, w32, backend="torch:grouped_mm")
        else:
            unavailable["torch_fp32_grouped_mm"] = capabilities.grouped_mm_unavailable_reason(device, torch.float32)
        dense = (torch.randn(T, Kd, device=device), torch.randn(Kd, N, device=device))
        base32["torch_fp32_dense_mm"] = lambda: torch.mm(*dense)  # same flops, one GEMM: an upper bound
        configs = args.numba_configs if not args.smoke else ["8x8x4"]
        nb = {f"numba_fp32_{c}": (lambda c=c: K.grouped_gemm(x32, groups, split32, backend=f"numba:{c}"))
              for c in configs}
        ref = reference.run(K.make_problem(x32, groups, w32))  # float64 math
        for k, fn in list({**base32, **nb}.items()):
            if k == "torch_fp32_dense_mm":
                continue
            t0 = time.perf_counter()
            try:
                e = rel_err(fn(), ref)
            except Exception as exc:
                log(f"    check {k}: FAILED {type(exc).__name__}: {exc}")
                traceback.print_exc()
                checks.append(dict(shape=name, tokens=tokens, variant=k, rel_err=math.inf, tol=1e-5, ok=False,
                                   error=f"{type(exc).__name__}: {str(exc)[:300]}"))
                base32.pop(k, None)
                nb.pop(k, None)
                continue
            checks.append(dict(shape=name, tokens=tokens, variant=k, rel_err=e, tol=1e-5, ok=bool(e < 1e-5)))
            log(f"    check {k}: rel err {e:.2e} ({time.perf_counter() - t0:.1f} s incl. compile)")
        ref = None
        if not nb:
            unavailable["numba"] = "every Numba config failed (see checks)"
            return
        times = timer.rounds({**base32, **nb}, args.numba_reps, 1)
        med = {k: statistics.median(v) for k, v in times.items()}
        best_torch = max(("torch_fp32_per_expert", "torch_fp32_grouped_mm"), key=lambda k: 1 / med.get(k, math.inf))
        common = dict(shape=name, K=Kd, N=N, experts=E, tokens=tokens, rows=T)
        for r in summarize_times(times, best_torch, flops, common, "numba_fp32", timer.calls):
            r["vs_torch_fp32"] = r["ratio"]
            rows_out.append(r)
            log(f"    {r['variant']:>26}: {r['ms']:9.3f} ms  {r['tflops']:8.2f} TFLOP/s  x{r['ratio']:.3f} of {best_torch}")
        dense = None
        # bf16 weights and activations through the Numba kernel (upcast in the kernel), vs torch bf16
        best_cfg = min((c for c in configs if f"numba_fp32_{c}" in med), key=lambda c: med[f"numba_fp32_{c}"])
        splitbf = [(a, wbf[a:a + t.shape[0]]) for a, t in split32] if isinstance(split32, list) else wbf
        bfv = {"torch_bf16_grouped_mm": lambda: K.grouped_gemm(xbf, groups, wbf, backend="torch"),
               f"numba_bf16_{best_cfg}": lambda: K.grouped_gemm(xbf, groups, splitbf, backend=f"numba:{best_cfg}")}
        e = rel_err(bfv[f"numba_bf16_{best_cfg}"](), bfv["torch_bf16_grouped_mm"]())
        checks.append(dict(shape=name, tokens=tokens, variant=f"numba_bf16_{best_cfg}", rel_err=e, tol=1e-2,
                           ok=bool(e < 1e-2)))
        log(f"    check numba_bf16_{best_cfg}: rel err vs torch bf16 {e:.2e}")
        times = timer.rounds(bfv, args.numba_reps, 1)
        for r in summarize_times(times, "torch_bf16_grouped_mm", flops, common, "numba_bf16", timer.calls):
            r["vs_torch_bf16"] = r["ratio"]
            rows_out.append(r)
            log(f"    {r['variant']:>26}: {r['ms']:9.3f} ms  {r['tflops']:8.2f} TFLOP/s")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32


# ---- summary -------------------------------------------------------------------------------------
RATIO_ORDER = [NOISE, "contiguous", "contiguous_host_sizes", "composite", "split", "split_async", "split_serial", "split_per_expert",
               "fp8_contiguous", "fp8_split", "fp8_with_quant"]


def summarize(rows) -> dict:
    """Per variant: the per-round median ratio at every size, its min, the noise floor beside it."""
    bf = [r for r in rows if r["section"] == "bf16"]
    keys = sorted({(r["shape"], r["tokens"]) for r in bf})
    at = {(r["shape"], r["tokens"], r["variant"]): r for r in bf}
    noise = {f"{s}@{t}": at[(s, t, NOISE)]["ratio"] for s, t in keys if (s, t, NOISE) in at}
    noise_band = {f"{s}@{t}": [at[(s, t, NOISE)]["ratio_p10"], at[(s, t, NOISE)]["ratio_p90"]]
                  for s, t in keys if (s, t, NOISE) in at}
    ratios = {}
    for v in RATIO_ORDER:
        vals = {f"{s}@{t}": at[(s, t, v)]["ratio"] for s, t in keys if (s, t, v) in at}
        if not vals:
            continue
        target = TARGETS.get(v)
        lo = min(vals.values())
        ratios[f"{v} / raw_grouped_mm"] = dict(
            values=vals, min=lo, target=target, meets=None if target is None else lo >= target,
            p10={f"{s}@{t}": at[(s, t, v)]["ratio_p10"] for s, t in keys if (s, t, v) in at},
            p90={f"{s}@{t}": at[(s, t, v)]["ratio_p90"] for s, t in keys if (s, t, v) in at},
            noise_floor=noise, noise_band=noise_band)
    moe = [r for r in rows if r["section"] == "moe" and r["variant"] != "moe_contiguous"]
    for v in sorted({r["variant"] for r in moe}):
        vals = {f"moe@{r['tokens']}": r["ratio"] for r in moe if r["variant"] == v}
        ratios[f"{v} / moe_contiguous"] = dict(values=vals, min=min(vals.values()), target=None, meets=None)
    nb = [r for r in rows if r["section"] == "numba_fp32" and r["variant"].startswith("numba")]
    if nb:
        best = max(nb, key=lambda r: r["tflops"])
        ratios["numba_fp32 / torch_fp32"] = dict(values={r["variant"]: r["vs_torch_fp32"] for r in nb},
                                                 max=best["vs_torch_fp32"], best=best["variant"], target=0.3,
                                                 meets=best["vs_torch_fp32"] >= 0.3)
    return ratios


def print_table(rows, ratios, checks, unavailable, host):
    log("\n# results (times: median over rounds; ratio: t_raw / t_variant per round, median; "
        "TFLOP/s = 2*rows*K*N / time)")
    log(f"{'section':>10} {'shape':>8} {'tokens':>7} {'rows':>8} {'variant':>22} {'ms':>10} {'TFLOP/s':>9} "
        f"{'ratio':>7} {'p10':>6} {'p90':>6}")
    for r in rows:
        log(f"{r['section']:>10} {r['shape']:>8} {r['tokens']:>7} {r['rows']:>8} {r['variant']:>22} "
            f"{r['ms']:>10.3f} {r['tflops']:>9.2f} {r['ratio']:>7.3f} {r['ratio_p10']:>6.3f} {r['ratio_p90']:>6.3f}")
    wrong = [c for c in checks if not c["ok"]]
    log(f"\n# checks: {len(checks) - len(wrong)} ok, {len(wrong)} wrong" +
        "".join(f"\n#wrong {c['shape']} tokens={c['tokens']} {c['variant']}: rel err {c['rel_err']:.3g} >= {c['tol']}"
                for c in wrong))
    for k, v in unavailable.items():
        log(f"# unavailable: {k}: {v}")
    if host:
        bad = [h["form"] for h in host if h["syncs"] and "validated" not in h["form"]]
        log(f"# host: wrapper {next((h['host_us'] for h in host if h['form'].startswith('contiguous, TokenGroups')), 0):.0f} us"
            f"/call vs raw {host[0]['host_us']:.0f} us/call; unexpected syncs: {bad or 'none'}")
    gemm = {k: v for k, v in ratios.items() if "values" in v and k.split(" /")[0] in RATIO_ORDER}
    if gemm:
        sizes = list(next(iter(gemm.values()))["values"])
        log("\n# ratios vs raw_grouped_mm (median per-round t_raw / t_variant; noise floor = raw against itself)")
        log(f"{'variant':>22} " + " ".join(f"{s:>13}" for s in sizes) + f" {'min':>6} {'target':>6}  verdict")
        for k, v in gemm.items():
            name = k.split(" /")[0]
            cells = " ".join(f"{v['values'].get(s, math.nan):>13.3f}" for s in sizes)
            tgt = "" if v["target"] is None else f"{v['target']:.2f}"
            verdict = "" if v["target"] is None else ("MET" if v["meets"] else "NOT MET")
            if v["target"] is not None and not v["meets"]:
                nf = min(v["noise_floor"].values()) if v["noise_floor"] else 1.0
                if v["min"] >= v["target"] - (1 - nf) and nf < 1:
                    verdict += " (within noise)"
            log(f"{name:>22} {cells} {v['min']:>6.3f} {tgt:>6}  {verdict}")
    for k, v in ratios.items():
        if k.endswith("/ moe_contiguous"):
            log(f"{k.split(' /')[0]:>22} " + " ".join(f"{s}: {r:.3f}" for s, r in v["values"].items())
                + "  (vs moe_mlp on contiguous weights)")
    if "numba_fp32 / torch_fp32" in ratios:
        v = ratios["numba_fp32 / torch_fp32"]
        log(f"{'numba_fp32/torch_fp32':>22} best {v['max']:.3f} ({v['best']})  target >= {v['target']}: "
            f"{'MET' if v['meets'] else 'NOT MET'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="8192,16384,32768,65536", help="tokens (before top-k), comma separated")
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--shapes", default="gate_up,down")
    ap.add_argument("--rounds", "--reps", dest="reps", type=int, default=7,
                    help="timed rounds (one block of every variant per round)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds (at least --warmup-ms of work)")
    ap.add_argument("--block-ms", type=float, default=150.0, help="length of one timed block of back-to-back calls")
    ap.add_argument("--lead", type=float, default=0.5, help="untimed calls before each block, as a fraction of it")
    ap.add_argument("--order", choices=("random", "rotate"), default="random",
                    help="order of the variants' blocks in each round: a fresh random one, or one order rotated")
    ap.add_argument("--warmup-ms", type=float, default=600.0, help="least GPU time of the untimed rounds")
    ap.add_argument("--numba-tokens", type=int, default=8192)
    ap.add_argument("--numba-configs", default="128x128x8,64x128x8,64x64x16")
    ap.add_argument("--numba-reps", type=int, default=3)
    ap.add_argument("--no-numba", action="store_true")
    ap.add_argument("--moe-tokens", default="8192,32768", help="tokens of the moe_mlp section")
    ap.add_argument("--no-moe", action="store_true", help="skip the moe_mlp section")
    ap.add_argument("--no-fp8", action="store_true", help="skip the fp8 variants")
    ap.add_argument("--no-host", action="store_true", help="skip the host-overhead section")
    ap.add_argument("--per-expert", action="store_true", help="also time the per-expert torch.mm variant (slow)")
    ap.add_argument("--skip-per-expert", action="store_true", help=argparse.SUPPRESS)  # the default now
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (the default without a GPU)")
    ap.add_argument("--seed", type=int, default=None, help="default: fresh")
    ap.add_argument("--json", default=None, help="output file (default $OUT/grouped_gemm.json when OUT is set)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        args.smoke = True
        torch.set_num_threads(1)  # tiny CPU GEMMs: threads only add noise (and contend with other jobs)
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    if args.smoke:
        args.experts = min(args.experts, 16)
        args.top_k = min(args.top_k, 4)
        args.tokens = "32,64" if args.tokens == ap.get_default("tokens") else args.tokens
        args.reps = min(args.reps, 5)
        args.numba_tokens = min(args.numba_tokens, 24)
        args.block_ms = min(args.block_ms, 2.0)
    if args.smoke and args.moe_tokens == ap.get_default("moe_tokens"):
        args.moe_tokens = "48"
    args.tokens = [int(t) for t in str(args.tokens).split(",")]
    args.moe_tokens = [int(t) for t in str(args.moe_tokens).split(",")]
    args.numba_configs = args.numba_configs.split(",")
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little") % 2**31
    info = record.env_info(device)
    log(f"# bench_grouped_gemm  {info['date']}  host={info['host']}  gpu={info.get('gpu')}  torch={info['torch']}  "
        f"numba={info['numba']}  commit={info['git']['commit'][:12]}{'+dirty' if info['git']['dirty'] else ''}")
    log(f"# experts={args.experts} top_k={args.top_k} tokens={args.tokens} shapes={args.shapes} owners={OWNERS} "
        f"rounds={args.reps} block={args.block_ms:g} ms warmup={args.warmup} rounds/{args.warmup_ms:g} ms seed={seed}"
        f"{'  SMOKE' if args.smoke else ''}")
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 everywhere in this run
    torch.set_float32_matmul_precision("highest")
    timer = Timer(device, block_ms=args.block_ms, warmup_ms=args.warmup_ms, lead=args.lead, order=args.order,
                  order_seed=seed)
    rows, checks, unavailable, host = [], [], {}, []
    t0 = time.perf_counter()
    if not args.no_host:
        try:
            host = bench_host(args, device, rows, unavailable)
        except Exception as exc:
            log(f"# host section FAILED {type(exc).__name__}: {exc}")
            traceback.print_exc()
            unavailable["host"] = f"section failed: {type(exc).__name__}: {str(exc)[:300]}"
    with contextlib.ExitStack() as stack:  # the one-rank group lives while the sections run
        group = open_group(stack, device, unavailable)
        for name in args.shapes.split(","):
            Kd, N = shapes[name]
            bench_shape(name, Kd, N, args, device, timer, seed, rows, checks, unavailable, group)
        if not args.no_moe:
            try:
                bench_moe(args, device, timer, seed, rows, checks, unavailable, group)
            except Exception as exc:
                log(f"# moe section FAILED {type(exc).__name__}: {exc}")
                traceback.print_exc()
                checks.append(dict(shape="moe", tokens=0, variant="moe (section)", rel_err=math.inf, tol=0, ok=False,
                                   error=f"{type(exc).__name__}: {str(exc)[:300]}"))
        try:
            bench_numba(args, device, timer, seed, rows, checks, unavailable)
        except Exception as exc:
            log(f"# numba section FAILED {type(exc).__name__}: {exc}")
            traceback.print_exc()
            unavailable["numba"] = f"section failed: {type(exc).__name__}: {str(exc)[:300]}"
            checks.append(dict(shape="down", tokens=args.numba_tokens, variant="numba (section)", rel_err=math.inf,
                               tol=0, ok=False, error=unavailable["numba"]))
    ratios = summarize(rows)
    print_table(rows, ratios, checks, unavailable, host)
    elapsed = time.perf_counter() - t0
    log(f"# elapsed {elapsed:.1f} s")
    result = dict(env=info, args={k: v for k, v in vars(args).items()}, seed=seed,
                  method=("sustained blocks of back-to-back calls (about block_ms each, no sync/sleep/flush inside, "
                          "after lead x that many untimed calls of the same variant), "
                          "one block per variant per round, a fresh random order per round, untimed warm-up rounds "
                          "first; CUDA events around each block, time per call = block / calls; ratio = "
                          "t_raw / t_variant within a round, median over rounds; times are medians"),
                  results=rows, checks=checks, ratios=ratios, host=host, unavailable=unavailable,
                  elapsed_s=round(elapsed, 1))
    path = record.write_json(record.result_path(args.json, "grouped_gemm.json"), result)
    if path:
        log(f"# wrote {path}")
    return 1 if any(not c["ok"] for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())

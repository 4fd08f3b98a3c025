"""Hugging Face's ``grouped_mm`` experts forward vs :func:`dwdp_comm.moe.experts_forward`, side by side.

Experts built from real HF configs (``Qwen3MoeExperts``: E=128, H=2048, I=768, top-8;
``DeepseekV3Experts``: E=256, H=7168, I=2048, top-8), random bf16 weights, random top-k routing
(distinct experts per token, softmax weights in the router's dtype: bf16 for Qwen3, float32 for
DeepSeek-V3). Variants, all on the same weights and routing:
  hf            transformers.integrations.moe.grouped_mm_experts_forward(module, ...)   (the baseline)
  hf_again      the same call timed as its own variant: the noise floor of every ratio
  ours          experts_forward on the module's weights (contiguous [E, N, K], weight_layout="nk")
  ours_vmm      experts_forward on 4 pieces in 4 backend buffers composed into one virtual range
                (dwdp_comm.bench.split_weights on a one-rank cuda_ipc group, VMM), passed as slices,
                as a composite prefetch handle's weight_segments gives them: the DWDP case
  ours_split    experts_forward on 4 pieces (4 owners, each piece its own allocation)
  ours_split_mlp the same 4 pieces through one moe_mlp call (split_path="moe_mlp")
  ours_notriton experts_forward with the Triton kernels off (torch fallbacks)
  old           the library path before: permute_tokens + moe_mlp (kn weights made once) + unpermute_tokens
Correctness: every variant against hf before timing (relative Frobenius error, bf16 tolerance).
Timing: dwdp_comm.bench.timing.Timer, as perf/bench_grouped_gemm.py (sustained blocks, random order
per round, ratios within a round). Ratio = t_hf / t_variant (>= 1: as fast as HF).
Usage: python3 -m perf.bench_hf_experts [--json FILE]   (default $OUT/hf_experts.json)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
import torch  # noqa: E402

import dwdp_comm.kernels as K  # noqa: E402
from dwdp_comm import moe  # noqa: E402
from dwdp_comm.bench import record  # noqa: E402
from dwdp_comm.bench.split_weights import SplitWeights, single_rank_group  # noqa: E402
from dwdp_comm.bench.timing import Timer, rel_err, summarize_times  # noqa: E402
from dwdp_comm.kernels import triton_moe  # noqa: E402
from perf.bench_sizes import experts_module, routing  # noqa: E402  (one home of the experts and routing)

OWNERS = 4
VARIANTS = ("hf_again", "ours", "ours_vmm", "ours_split", "ours_split_mlp", "ours_notriton", "old")  # the summary's columns


def log(*a) -> None:
    print(*a, flush=True)


def build(family: str, device, smoke: bool):
    """HF's experts module of ``family`` (``qwen3``, ``deepseek``) at real size (tiny with ``smoke``),
    HF's grouped_mm forward and the router's dtype (bf16 for Qwen3, float32 for DeepSeek-V3)."""
    from transformers.integrations import moe as hfmoe
    m, _, rdt = experts_module({"qwen3": "qwen3_moe", "deepseek": "deepseek_v3"}[family], device, smoke)
    return m, hfmoe.grouped_mm_experts_forward, rdt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qwen3-tokens", default="4096,16384,65536")
    ap.add_argument("--deepseek-tokens", default="4096,16384,32768")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--block-ms", type=float, default=100.0)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        args.smoke = True
    if args.smoke:
        args.qwen3_tokens, args.deepseek_tokens, args.rounds, args.block_ms = "64", "48", 2, 2.0
    import transformers
    info = record.env_info(device)
    info["transformers"] = transformers.__version__
    log(f"# bench_hf_experts {info['date']} gpu={info.get('gpu')} torch={info['torch']} "
          f"transformers={transformers.__version__} commit={info['git']['commit'][:12]}")
    timer = Timer(device, block_ms=args.block_ms, warmup_ms=300.0)
    rows, checks = [], []
    seed = int.from_bytes(os.urandom(4), "little") % 2**31
    stack = contextlib.ExitStack()
    try:  # the backend's own buffers and composite views, as the prefetcher's slots
        group = stack.enter_context(single_rank_group("cuda_ipc" if device.type == "cuda" else "sim"))
    except Exception as exc:
        group = None
        log(f"# no one-rank group ({type(exc).__name__}: {exc}): ours_vmm skipped")
    for family, toks in (("qwen3", args.qwen3_tokens), ("deepseek", args.deepseek_tokens)):
        m, hf_fwd, rdt = build(family, device, args.smoke)
        E, k = m.num_experts, 8
        gu, dn = m.gate_up_proj.data, m.down_proj.data
        cuts = [round(i * E / OWNERS) for i in range(OWNERS + 1)]
        s_gu = [(a, gu[a:b].clone()) for a, b in zip(cuts[:-1], cuts[1:])]
        s_dn = [(a, dn[a:b].clone()) for a, b in zip(cuts[:-1], cuts[1:])]
        vmm, v_gu, v_dn = [], None, None
        if group is not None:
            try:
                vmm = [SplitWeights(group, gu, cuts), SplitWeights(group, dn, cuts)]
                why = next((v.why_not for v in vmm if v.composite is None), None)
            except Exception as exc:
                why = f"{type(exc).__name__}: {exc}"
            if why is None:
                v_gu, v_dn = ([(a, v.composite[a:b]) for a, b in zip(cuts[:-1], cuts[1:])] for v in vmm)
            else:
                log(f"# {family}: no composite ({why}): ours_vmm skipped")
        w13_kn, w2_kn = gu.transpose(1, 2).contiguous(), dn.transpose(1, 2).contiguous()  # the old path's layout
        for t in [int(v) for v in toks.split(",")]:
            x = torch.randn(t, m.hidden_dim, device=device, dtype=torch.bfloat16)
            idx, w = routing(t, E, k, rdt, device, seed + t)

            def notriton():
                triton_moe.ENABLED = False
                try:
                    return moe.experts_forward(x, idx, w, gu, dn)
                finally:
                    triton_moe.ENABLED = True

            def old():
                xs, ms, order = moe.permute_tokens(x, idx, E)
                return moe.unpermute_tokens(K.moe_mlp(xs, ms, w13_kn, w2_kn), order, w)

            fns = {"hf": lambda: hf_fwd(m, x, idx, w), "hf_again": lambda: hf_fwd(m, x, idx, w),
                   "ours": lambda: moe.experts_forward(x, idx, w, gu, dn),
                   "ours_split": lambda: moe.experts_forward(x, idx, w, s_gu, s_dn),
                   "ours_split_mlp": lambda: moe.experts_forward(x, idx, w, s_gu, s_dn, split_path="moe_mlp"),
                   "ours_notriton": notriton, "old": old}
            if v_gu is not None:
                fns["ours_vmm"] = lambda: moe.experts_forward(x, idx, w, v_gu, v_dn)
            ref = fns["hf"]()
            for name, fn in fns.items():
                try:
                    err = rel_err(fn(), ref)
                except Exception as exc:  # a failed variant is reported, not timed
                    err = float("inf")
                    log(f"# {family} {t} {name} FAILED {type(exc).__name__}: {exc}")
                ok = err < 2e-2
                checks.append(dict(family=family, tokens=t, variant=name, rel_err=err, ok=ok))
                log(f"check {family:8s} T={t:6d} {name:14s} rel_err={err:.2e} {'ok' if ok else 'WRONG'}")
            good = {n: f for n, f in fns.items() if all(c["ok"] for c in checks if c["variant"] == n
                                                         and c["tokens"] == t and c["family"] == family)}
            if "hf" not in good:
                continue
            times = timer.rounds(good, args.rounds)
            flops = 2 * t * k * (m.hidden_dim * 2 * m.intermediate_dim + m.intermediate_dim * m.hidden_dim)
            res = summarize_times(times, "hf", flops, dict(family=family, tokens=t), "experts", timer.calls)
            rows.extend(res)
            log(f"{family:8s} T={t:6d} " + "  ".join(f"{r['variant']}={r['ms']:.3f}ms x{r['ratio']:.3f}" for r in res))
        for v in vmm:
            v.close()
        del m, gu, dn, s_gu, s_dn, w13_kn, w2_kn, vmm, v_gu, v_dn
        torch.cuda.empty_cache() if device.type == "cuda" else None
    log("\n# ratio = t_hf / t_variant (median over rounds), >= 1 means as fast as HF")
    log(f"{'family':9s} {'tokens':>7s} " + " ".join(f"{v:>14s}" for v in VARIANTS))
    for fam in ("qwen3", "deepseek"):
        for t in sorted({r["tokens"] for r in rows if r["family"] == fam}):
            rr = {r["variant"]: r for r in rows if r["family"] == fam and r["tokens"] == t}
            log(f"{fam:9s} {t:7d} " + " ".join(f"{rr[v]['ratio']:14.3f}" if v in rr else f"{'-':>14s}"
                                                  for v in VARIANTS))
    result = dict(env=info, args=vars(args), seed=seed, method="dwdp_comm.bench.timing.Timer: sustained blocks, "
                  "random order per round, ratio t_hf / t_variant within a round, median over rounds",
                  results=rows, checks=checks)
    path = record.write_json(record.result_path(args.json, "hf_experts.json"), result)
    if path:
        log(f"# wrote {path}")
    stack.close()
    return 1 if any(not c["ok"] for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())

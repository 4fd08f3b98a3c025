"""Fast at every size: the experts path and the whole model against Hugging Face's own, side by side.

Part ``experts``: five families' experts modules at their real sizes, random bf16 weights and
random top-k routing; Hugging Face's ``grouped_mm_experts_forward(module, ...)`` (the baseline) vs
the call a converted model makes, :func:`dwdp_comm.moe.experts_forward` with the site's layout,
gate and biases (:func:`dwdp_comm.integrations.transformers.find_experts`). Token counts 16 .. 64K.
Eager: :class:`dwdp_comm.bench.timing.Timer` blocks of back-to-back calls (host time shows where
the GPU waits for the host, as in a real forward). Graphs: both forwards captured into a CUDA
graph and their replays timed the same way; a side that cannot be captured is reported, not timed.

Part ``model``: a Qwen3-30B-A3B-shaped model of ``--layers`` layers, random weights; HF's own
forward against a copy of it after :func:`~dwdp_comm.integrations.transformers.convert` on a
one-rank group (the experts from the store, through the pipeline, as a user runs it): prefill of
one sequence at 128, 256, 1K, 4K tokens; decode (``generate``, greedy) at batch 32, tokens/s.

Ratio = t_hf / t_ours (median of per-round ratios): >= 1 means as fast as HF or faster.

Usage: python3 -m perf.bench_sizes [--parts experts,model] [--families ...] [--tokens ...]
       [--json FILE]   (default $OUT/bench_sizes.json); --smoke: tiny shapes (CPU test).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
import torch  # noqa: E402

from dwdp_comm import moe  # noqa: E402
from dwdp_comm.bench import record  # noqa: E402
from dwdp_comm.bench.split_weights import single_rank_group  # noqa: E402
from dwdp_comm.bench.timing import Timer, rel_err, summarize_times  # noqa: E402

FAMILIES = ("qwen3_moe", "deepseek_v3", "mixtral", "olmoe", "gpt_oss")
TOKENS = "16,32,64,128,256,512,1024,2048,4096,8192,16384,32768,65536"


def log(*a) -> None:
    print(*a, flush=True)


def experts_module(family: str, device, smoke: bool):
    """``(module, top_k, router dtype)``: HF's experts module of ``family`` at real size (tiny with smoke)."""
    import transformers
    s = smoke
    if family == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as cls
        cfg = transformers.Qwen3MoeConfig(hidden_size=64 if s else 2048, moe_intermediate_size=32 if s else 768,
                                          num_experts=16 if s else 128, num_experts_per_tok=8)
        k, rdt = 8, torch.bfloat16
    elif family == "deepseek_v3":
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts as cls
        cfg = transformers.DeepseekV3Config(hidden_size=64 if s else 7168, moe_intermediate_size=32 if s else 2048,
                                            n_routed_experts=16 if s else 256, num_experts_per_tok=8)
        k, rdt = 8, torch.float32
    elif family == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts as cls
        cfg = transformers.MixtralConfig(hidden_size=64 if s else 4096, intermediate_size=96 if s else 14336,
                                         num_local_experts=8, num_experts_per_tok=2)
        k, rdt = 2, torch.bfloat16
    elif family == "olmoe":
        from transformers.models.olmoe.modeling_olmoe import OlmoeExperts as cls
        cfg = transformers.OlmoeConfig(hidden_size=64 if s else 2048, intermediate_size=32 if s else 1024,
                                       num_experts=16 if s else 64, num_experts_per_tok=8)
        k, rdt = 8, torch.bfloat16
    elif family == "gpt_oss":
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts as cls
        cfg = transformers.GptOssConfig(hidden_size=64 if s else 2880, intermediate_size=64 if s else 2880,
                                        num_local_experts=16 if s else 128, num_experts_per_tok=4)
        k, rdt = 4, torch.bfloat16
    else:
        raise SystemExit(f"--families: unknown family {family!r}; known: {', '.join(FAMILIES)}")
    cfg._experts_implementation = "grouped_mm"
    return random_bf16(cls, cfg, device), k, rdt


def random_bf16(cls, cfg, device) -> torch.nn.Module:
    """``cls(cfg)`` built on ``device`` with bf16 parameters (bf16 the default dtype while it is
    built, as a bf16 ``from_pretrained`` builds it: no float32 copy of tens of GB), every parameter
    then N(0, 0.02); buffers (the rotary ``inv_freq``) as the module computes them, in the dtype it
    gives them. (Built on meta and materialised with ``to_empty``, the buffers were uninitialised
    memory: NaN logits from HF and ours alike for some seeds.)"""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            m = cls(cfg)
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    return m


def routing(t: int, e: int, k: int, rdt, device, seed: int):
    """Random top-k routing: ``k`` distinct experts per token, softmax weights renormalised, in ``rdt``."""
    g = torch.Generator(device=device).manual_seed(seed)
    val, idx = torch.randn(t, e, device=device, generator=g).softmax(-1).topk(k, dim=-1)
    return idx, (val / val.sum(-1, keepdim=True)).to(rdt)


def ours_fn(m):
    """The experts call a converted model makes for ``m`` (whole local weights, no prefetch)."""
    from dwdp_comm.integrations.transformers import find_experts
    (site,) = find_experts(m)
    first = site.names[0]
    w = {n: getattr(m, n) for n in site.names}
    act = getattr(m, "act_fn", None)

    def run(x, idx, wts):
        return moe.experts_forward(x, idx, wts, w[first], w["down_proj"], gate_up_bias=w.get(first + "_bias"),
                                   down_bias=w.get("down_proj_bias"), weight_layout=site.weight_layout,
                                   gate=site.gate, act_fn=act)
    return run


def capture(fn, device):
    """A CUDA graph of ``fn()`` (warmed up on a side stream first) and its output, or the reason it failed."""
    try:
        s = torch.cuda.Stream(device)
        s.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(s):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(device).wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = fn()
        g.replay()
        return g, out, None
    except Exception as exc:  # a capture failure is a result (HF's path may sync on the host)
        torch.cuda.synchronize(device)
        return None, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"


def bench_experts(args, device, timer, rows, checks) -> None:
    cuda = device.type == "cuda"
    from transformers.integrations import moe as hfmoe
    for family in args.families.split(","):
        m, k, rdt = experts_module(family, device, args.smoke)
        E, H = int(m.num_experts), int(getattr(m, "hidden_dim", None) or m.hidden_size)
        ours = ours_fn(m)
        flops_tok = 2 * k * sum(int(getattr(m, n).numel()) // E for n in ("gate_up_proj", "down_proj"))
        for t in [int(v) for v in args.tokens.split(",")]:
            try:
                x = torch.randn(t, H, device=device, dtype=torch.bfloat16)
                idx, w = routing(t, E, k, rdt, device, args.seed + t)
                fns = {"hf": lambda: hfmoe.grouped_mm_experts_forward(m, x, idx, w), "ours": lambda: ours(x, idx, w)}
                ref = fns["hf"]()
                err = rel_err(fns["ours"](), ref)
                ref = ref.cpu()  # off the GPU while timing: HF's path at DeepSeek-V3 64K is within ~1 GiB of 80 GB
                ok = err < 2e-2
                checks.append(dict(part="experts", family=family, tokens=t, rel_err=err, ok=ok))
                if not ok:
                    log(f"check {family} T={t}: ours vs hf rel_err={err:.2e} WRONG (not timed)")
                    continue
                res = summarize_times(timer.rounds(fns, args.rounds), "hf", flops_tok * t,
                                      dict(part="experts", mode="eager", family=family, tokens=t), "experts", timer.calls)
                rows.extend(res)
                line = f"{family:11s} T={t:6d} eager " + " ".join(f"{r['variant']}={r['ms']:.3f}ms" for r in res)
                line += f" ratio={next(r['ratio'] for r in res if r['variant'] == 'ours'):.3f}"
                if cuda and t <= args.graph_max_tokens:
                    graphs, outs, why = {}, {}, {}
                    for name, fn in fns.items():
                        g, out, whyn = capture(fn, device)
                        if g is None:
                            why[name] = whyn
                        else:
                            graphs[name], outs[name] = g, out
                    if "ours" in outs:
                        gerr = rel_err(outs["ours"], ref.to(device))
                        checks.append(dict(part="experts_graph", family=family, tokens=t, rel_err=gerr, ok=gerr < 2e-2))
                    if len(graphs) == 2:
                        gres = summarize_times(timer.rounds({n: g.replay for n, g in graphs.items()}, args.rounds),
                                               "hf", flops_tok * t, dict(part="experts", mode="graph", family=family,
                                                                         tokens=t), "experts", timer.calls)
                        rows.extend(gres)
                        line += f" | graph ratio={next(r['ratio'] for r in gres if r['variant'] == 'ours'):.3f}"
                    else:
                        rows.append(dict(part="experts", mode="graph", family=family, tokens=t, variant="none",
                                         not_captured=why))
                        line += f" | graph: not captured {why}"
                    del graphs, outs
                log(line)
                del x, idx, w, ref, fns
            except torch.OutOfMemoryError as exc:
                mem = {k: round(f() / 2 ** 30, 2) for k, f in (("allocated_gib", torch.cuda.memory_allocated),
                                                                ("reserved_gib", torch.cuda.memory_reserved),
                                                                ("peak_allocated_gib", torch.cuda.max_memory_allocated))}
                rows.append(dict(part="experts", family=family, tokens=t, variant="none", error=f"OOM: {exc}"[:300],
                                 **mem))
                log(f"{family:11s} T={t:6d} out of memory: skipped ({mem})")
            if cuda:
                torch.cuda.empty_cache()
        del m, ours
        if cuda:
            torch.cuda.empty_cache()


def qwen3_model(layers: int, device, smoke: bool):
    import transformers
    cfg = transformers.Qwen3MoeConfig(
        hidden_size=64 if smoke else 2048, moe_intermediate_size=32 if smoke else 768,
        num_experts=16 if smoke else 128, num_experts_per_tok=8, num_hidden_layers=layers,
        num_attention_heads=4 if smoke else 32, num_key_value_heads=2 if smoke else 4, head_dim=16 if smoke else 128,
        intermediate_size=128 if smoke else 6144, vocab_size=512 if smoke else 151936, max_position_embeddings=8192,
        decoder_sparse_step=1, mlp_only_layers=[])
    cfg._experts_implementation = "grouped_mm"
    cfg._attn_implementation = "sdpa"
    return random_bf16(transformers.Qwen3MoeForCausalLM, cfg, device).eval()


def bench_model(args, device, timer, rows, checks) -> None:
    from dwdp_comm.integrations.transformers import convert
    cuda = device.type == "cuda"
    hf = qwen3_model(args.layers, device, args.smoke)
    ours = copy.deepcopy(hf)
    with single_rank_group("cuda_ipc" if cuda else "sim") as group, torch.no_grad(), \
            convert(ours, group, depth=2):
        vocab = hf.config.vocab_size
        for t in [int(v) for v in args.prefill.split(",")]:
            ids = torch.randint(0, vocab, (1, t), device=device, generator=torch.Generator(device).manual_seed(t))
            fns = {"hf": lambda: hf(ids).logits, "ours": lambda: ours(ids).logits}
            ref = fns["hf"]()
            err = rel_err(fns["ours"](), ref)
            ok = err < 3e-2
            checks.append(dict(part="model_prefill", tokens=t, rel_err=err, ok=ok))
            if not ok:
                log(f"model prefill T={t}: rel_err={err:.2e} WRONG (not timed)")
                continue
            res = summarize_times(timer.rounds(fns, args.rounds), "hf", 0.0,
                                  dict(part="model", mode="prefill", layers=args.layers, tokens=t), "model", timer.calls)
            rows.extend(res)
            log(f"model prefill T={t:5d} " + " ".join(f"{r['variant']}={r['ms']:.3f}ms" for r in res)
                + f" ratio={next(r['ratio'] for r in res if r['variant'] == 'ours'):.3f}")
        b, p, n = args.decode_batch, args.decode_prompt, args.decode_tokens
        ids = torch.randint(0, vocab, (b, p), device=device, generator=torch.Generator(device).manual_seed(7))
        toks = {}
        for name, m in (("hf", hf), ("ours", ours)):
            gen = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            toks[name] = m.generate(ids, **gen)  # warm-up and the tokens compared
            times = []
            for _ in range(args.rounds):
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                m.generate(ids, **gen)
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            times.sort()
            med = times[len(times) // 2]
            rows.append(dict(part="model", mode="decode", layers=args.layers, batch=b, prompt=p, new_tokens=n,
                             variant=name, s=med, tokens_per_s=b * n / med, s_rounds=times))
        same = bool(torch.equal(toks["hf"], toks["ours"]))
        checks.append(dict(part="model_decode", greedy_equal=same, ok=True))
        r = {x["variant"]: x for x in rows if x.get("mode") == "decode"}
        log(f"model decode batch={b} new={n}: hf {r['hf']['tokens_per_s']:.0f} tok/s, ours "
            f"{r['ours']['tokens_per_s']:.0f} tok/s, ratio {r['ours']['tokens_per_s'] / r['hf']['tokens_per_s']:.3f}; "
            f"greedy tokens equal: {same}")


def summary(rows) -> None:
    log("\n# ratio = t_hf / t_ours (median of per-round ratios); >= 1: as fast as HF or faster")
    exp = [r for r in rows if r.get("part") == "experts" and r.get("variant") == "ours"]
    fams = sorted({r["family"] for r in exp}, key=FAMILIES.index)
    toks = sorted({r["tokens"] for r in exp})
    for mode in ("eager", "graph"):
        log(f"experts ({mode})  " + " ".join(f"{t:>6d}" for t in toks))
        for f in fams:
            rr = {r["tokens"]: r["ratio"] for r in exp if r["family"] == f and r["mode"] == mode}
            log(f"  {f:14s} " + " ".join(f"{rr[t]:6.2f}" if t in rr else f"{'-':>6s}" for t in toks))
    for r in rows:
        if r.get("part") == "model" and r.get("variant") == "ours" and r.get("mode") == "prefill":
            log(f"model prefill T={r['tokens']:5d}: ratio {r['ratio']:.3f} ({r['ms']:.2f} ms ours)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="experts,model")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--tokens", default=TOKENS)
    ap.add_argument("--graph-max-tokens", type=int, default=65536)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prefill", default="128,256,1024,4096")
    ap.add_argument("--decode-batch", type=int, default=32)
    ap.add_argument("--decode-prompt", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--block-ms", type=float, default=50.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 2 rounds (what the CPU test runs)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        args.smoke = True
    if args.smoke:
        args.tokens, args.prefill, args.rounds, args.block_ms = "16,64", "16,32", 2, 2.0
        args.layers, args.decode_batch, args.decode_prompt, args.decode_tokens = 2, 2, 4, 3
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "little") % 2**31
    import transformers
    info = record.env_info(device)
    info["transformers"] = transformers.__version__
    log(f"# bench_sizes {info['date']} gpu={info.get('gpu')} torch={info['torch']} transformers="
        f"{transformers.__version__} commit={info['git']['commit'][:12]} seed={args.seed}")
    timer = Timer(device, block_ms=args.block_ms, warmup_ms=200.0)
    rows, checks = [], []
    with contextlib.ExitStack():
        parts = args.parts.split(",")
        if "experts" in parts:
            bench_experts(args, device, timer, rows, checks)
        if "model" in parts:
            bench_model(args, device, timer, rows, checks)
    summary(rows)
    result = dict(env=info, args=vars(args), method="dwdp_comm.bench.timing.Timer: sustained blocks of back-to-back "
                  "calls, random order per round, ratio t_hf / t_ours within a round, median over rounds; graphs: "
                  "replays of captured forwards timed the same way; decode: wall clock of generate, median",
                  results=rows, checks=checks)
    path = record.write_json(record.result_path(args.json, "bench_sizes.json"), result)
    if path:
        log(f"# wrote {path}")
    return 1 if any(not c["ok"] for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())

"""A Hugging Face transformers MoE model on DWDP, checked against the unmodified HF model.

Every rank builds the unmodified HF model (a tiny random config of a family, or ``from_pretrained``
of a local checkpoint directory) and runs it, then builds the DWDP model (the tiny config through
:func:`dwdp_comm.integrations.transformers.convert`; a checkpoint through
:func:`dwdp_comm.integrations.hf_loading.load_model`, each rank reading only its own experts) and
runs the same inputs: logits and greedy
``generate`` tokens must match ("check passed (tolerance ...)"; exit status 1 otherwise). It prints
tokens/s of both, expert memory per rank before/after, and the exposed prefetch time.

Examples::

    python examples/hf_moe.py --model mixtral --world-size 3                 # CPU, sim backend
    python examples/hf_moe.py --model gpt_oss --world-size 2 --backend cuda_ipc   # GPUs
    python examples/hf_moe.py --checkpoint /path/to/local/checkpoint --world-size 2 --backend cuda_ipc
    python examples/hf_moe.py --model qwen3_moe --backend cuda_ipc --cuda-graph   # + one forward captured, replayed
    python examples/hf_moe.py --make-checkpoint fp8-block /tmp/ds_fp8 --world-size 3   # quantized, offline

Quantized checkpoints (block-FP8 as DeepSeek-V3 / Qwen3-FP8, MXFP4 as GPT-OSS) load with their experts
kept quantized. ``--make-checkpoint fp8-block|mxfp4 DIR`` first writes a tiny one of the family (default
``deepseek_v3`` / ``gpt_oss``) into ``DIR`` and its dequantized values as a plain checkpoint into
``DIR-reference``, then runs as ``--checkpoint DIR --reference DIR-reference``. The unmodified HF
model is built from ``--reference`` when given; from a quantized ``--checkpoint`` without it, by HF's
own dequantizing loader (``Mxfp4Config`` / ``FineGrainedFP8Config(dequantize=True)``).

With ``--cuda-graph`` (bfloat16, the default dtype then) each rank also captures one DWDP forward
(``use_cache=False``) in a CUDA graph after ``DwdpPipeline.prepare_capture()``, replays it
``--replays`` times on new inputs and checks every replay against an eager DWDP forward on the
same input. Under capture the experts need bf16 weights on sm90 / sm100 (``torch._grouped_mm``'s
own kernel): float32 experts run per-expert GEMMs that read the token counts on the host, which a
capture refuses (:class:`dwdp_comm.GraphCaptureError`).

``--trace FILE`` records the prefetch telemetry of the DWDP run (logits, then ``generate``) and writes a
Chrome-trace / Perfetto JSON of every rank's compute stream, prefetch jobs and copies per peer;
``--telemetry FILE`` writes the records and every layer's routing histogram
(``dwdp_comm.routing_histogram``). Both print one line per layer and rank.

On GPUs rank r uses device ``r % device_count``: with more ranks than GPUs several ranks share one
GPU (a functional check only, the output says so). No hub access: ``--model`` is a family name
(``mixtral``, ``qwen3_moe``, ``deepseek_v3``, ``gpt_oss``, ``olmoe``, ``qwen2_moe``) or a local path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import dwdp_comm as dc
from dwdp_comm.integrations.hf_configs import FAMILIES, tiny_config

QUANT_FORMATS = {"fp8-block": ("fp8_block", "deepseek_v3"), "mxfp4": ("mxfp4", "gpt_oss")}


def _quantization(checkpoint) -> dict | None:
    """The checkpoint's ``quantization_config`` (None: not quantized)."""
    with open(os.path.join(checkpoint, "config.json")) as f:
        return json.load(f).get("quantization_config") or None


def _dequantizing_config(checkpoint):
    """HF's quantization config that dequantizes ``checkpoint``'s quantized tensors at load (None: not quantized)."""
    import transformers as tf
    quant = _quantization(checkpoint)
    if not quant:
        return None
    if quant.get("quant_method") == "mxfp4":
        return tf.Mxfp4Config(dequantize=True)
    if quant.get("quant_method") == "fp8":
        return tf.FineGrainedFP8Config(weight_block_size=quant.get("weight_block_size"), dequantize=True)
    raise SystemExit(f"--checkpoint: quant_method {quant.get('quant_method')!r}: give --reference, a plain "
                     "checkpoint of the same model, to build the unmodified HF model from")


def make_checkpoint(args) -> None:
    """--make-checkpoint FMT DIR: a tiny random model of the family saved quantized into DIR, and its
    dequantized values into DIR-reference (the reference the check compares against)."""
    import transformers as tf
    from dwdp_comm.integrations.hf_quant_checkpoint import save_quantized
    fmt, directory = args.make_checkpoint
    weight_format, family = QUANT_FORMATS[fmt]
    family = args.model or family
    if family not in FAMILIES:
        raise SystemExit(f"--model: {family!r} is not one of {FAMILIES} (--make-checkpoint writes a tiny config)")
    torch.manual_seed(args.seed)
    extra = {"intermediate_size": 32} if family == "gpt_oss" else {}  # MXFP4: K a multiple of 32
    model = tf.AutoModelForCausalLM.from_config(tiny_config(family, num_experts=args.experts, num_layers=args.layers,
                                                            **extra), dtype=torch.float32)
    with torch.no_grad():  # HF zero-initialises some expert tensors: random ones are a better check
        for n, p in model.named_parameters():
            if "experts" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    args.checkpoint, args.reference = directory, f"{directory.rstrip(os.sep)}-reference"
    save_quantized(model, directory, weight_format, block_size=tuple(args.block_size), reference_dir=args.reference)
    print(f"wrote a tiny {family} checkpoint, {weight_format}, to {directory} (dequantized: {args.reference})")


def build(args, device):
    """The unmodified HF model: from_pretrained of the (reference) checkpoint, or a seeded tiny random config."""
    import transformers as tf
    dtype = getattr(torch, args.dtype)
    if args.checkpoint:
        source = args.reference or args.checkpoint
        kwargs = {} if args.reference else {"quantization_config": _dequantizing_config(source)}
        return tf.AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **{k: v for k, v in kwargs.items() if v}) \
            .to(device).eval()
    if args.model not in FAMILIES:
        raise SystemExit(f"--model: {args.model!r} is neither a local checkpoint directory nor one of {FAMILIES}")
    torch.manual_seed(args.seed)
    cfg = tiny_config(args.model, num_experts=args.experts, num_layers=args.layers)
    return tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device).eval()


def _run(model, ids, new_tokens, device):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    with torch.no_grad():
        logits = model(ids).logits
        sync()
        t0 = time.perf_counter()
        tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False)
        sync()
        dt = time.perf_counter() - t0
    return logits, tokens, ids.shape[0] * new_tokens / dt


def _graph_check(dm, ids, eager_logits, replays, gen, vocab, tol):
    """Capture one DWDP forward in a CUDA graph, replay it on new inputs, check each replay against eager.

    Returns a dict: replays, max |replay - eager| (and for the first replay, on ``ids``, against
    the eager logits given), host ms per forward eager vs replay (median), and whether all
    replays were within ``tol``. Needs CUDA; blocking.
    """
    dev = ids.device
    static = ids.clone()
    # HF builds its causal mask on the host side of a capture (is_tracing() is True while a stream
    # captures, and mask creation then copies a host scalar: refused under capture). A 4-D additive
    # mask made here, before capture, is used as given: the same input for graph and eager.
    b, t = ids.shape
    dtype = dm.model.dtype
    mask = torch.full((t, t), torch.finfo(dtype).min, device=dev, dtype=dtype).triu(1)[None, None].expand(b, 1, t, t)
    fwd = lambda inp: dm.model(inp, attention_mask=mask, use_cache=False).logits  # noqa: E731
    with torch.no_grad():
        side = torch.cuda.Stream(dev)  # warm-up on a side stream, as torch.cuda.graph asks
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                fwd(static)
        torch.cuda.current_stream(dev).wait_stream(side)
        dm.pipeline.prepare_capture()  # host-blocking: an idle pipeline, eager copies done
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fwd(static)
        graph.replay()
        torch.cuda.synchronize(dev)
        first = float((out.float() - eager_logits.float()).abs().max())
        worst, t_eager, t_graph = first, [], []
        for _ in range(replays):
            new = torch.randint(0, vocab, tuple(ids.shape), generator=gen).to(dev)
            static.copy_(new)
            dm.pipeline.prepare_capture()  # after eager forwards, before a replay
            t0 = time.perf_counter()
            graph.replay()
            t_graph.append(time.perf_counter() - t0)
            torch.cuda.synchronize(dev)
            got = out.clone()
            t0 = time.perf_counter()
            want = fwd(new)
            t_eager.append(time.perf_counter() - t0)
            worst = max(worst, float((got.float() - want.float()).abs().max()))
        del graph
    med = lambda v: sorted(v)[len(v) // 2] * 1e3 if v else float("nan")  # noqa: E731
    return {"replays": replays, "first_replay_vs_eager": first, "max_replay_vs_eager": worst,
            "host_ms_eager": med(t_eager), "host_ms_replay": med(t_graph), "ok": worst <= tol}


def _to_dwdp(args, group):
    """A checkpoint through load_model (each rank reads only its experts); a tiny config through convert."""
    if args.checkpoint:
        from dwdp_comm.integrations.hf_loading import load_model
        return load_model(args.checkpoint, group, dtype=getattr(torch, args.dtype), depth=args.depth)
    from dwdp_comm.integrations.transformers import convert
    return convert(build(args, group.device), group, depth=args.depth)


def rank_main(group, args):
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // group.size))
    dev = group.device
    ref = build(args, dev)
    gen = torch.Generator().manual_seed(args.seed + 1 + group.rank)  # each rank its own requests
    ids = torch.randint(0, ref.config.vocab_size, (args.batch, args.prompt), generator=gen).to(dev)
    want_logits, want_tokens, hf_tps = _run(ref, ids, args.new_tokens, dev)
    del ref
    with _to_dwdp(args, group) as dm:
        record = bool(args.trace or args.telemetry)
        if record:
            dm.pipeline.enable_telemetry(routing=bool(args.telemetry))
        dm.pipeline.exposed_seconds(reset=True)
        got_logits, got_tokens, dwdp_tps = _run(dm.model, ids, args.new_tokens, dev)
        exposed = dm.pipeline.exposed_seconds()
        telemetry = dm.pipeline.telemetry().as_dict() if record else None
        dm.pipeline.disable_telemetry()
        stats = dm.stats()
        diff = float((got_logits.float() - want_logits.float()).abs().max())
        loading = dm.loading and {k: v for k, v in dm.loading.items() if k != "expert_reads"}
        graph = None
        if args.cuda_graph:
            if dev.type != "cuda":
                raise dc.InvalidArgumentError(f"--cuda-graph: needs CUDA devices; this rank runs on {dev}")
            graph = _graph_check(dm, ids, got_logits, args.replays, gen, dm.model.config.vocab_size, args.tol)
        return {"cuda_graph": graph, "rank": group.rank, "backend": group.backend, "device": str(dev),
                "methods": sorted({s.method for s in dm.sites}), "logits_max_diff": diff,
                "tokens_equal": bool(torch.equal(got_tokens, want_tokens)), "hf_tokens_per_s": hf_tps,
                "dwdp_tokens_per_s": dwdp_tps, "exposed_prefetch_s": exposed, "memory": dm.memory,
                "loading": loading, "bytes_pulled": sum(s["bytes_pulled"] for s in stats.values()),
                "telemetry": telemetry}


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def _write_telemetry(args, telemetries: list) -> None:
    if not telemetries:
        return
    from dwdp_comm.telemetry import Telemetry, run_document
    from dwdp_comm.trace import write_trace
    for t in telemetries:
        for line in Telemetry.from_dict(t).summary_lines():
            print(line)
    if args.trace:
        write_trace(args.trace, telemetries, title=f"hf_moe {args.checkpoint or args.model} x{args.world_size}")
        print(f"wrote trace {args.trace} (open it at https://ui.perfetto.dev)")
    if args.telemetry:
        with open(args.telemetry, "w") as fh:
            json.dump(run_document(telemetries), fh)
        print(f"wrote telemetry {args.telemetry}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help=f"a family ({', '.join(FAMILIES)}; default mixtral) or a local "
                   "checkpoint dir (same as --checkpoint)")
    p.add_argument("--checkpoint", default=None, help="a local safetensors checkpoint dir: DWDP loads it with "
                   "load_model (each rank reads only its own experts), the reference with from_pretrained")
    p.add_argument("--reference", default=None, help="a plain checkpoint the unmodified HF model is built from "
                   "(default: --checkpoint; for a quantized one, HF's dequantizing loader)")
    p.add_argument("--make-checkpoint", nargs=2, metavar=("FORMAT", "DIR"), default=None,
                   help=f"write a tiny quantized checkpoint ({' or '.join(QUANT_FORMATS)}) of the family of --model "
                   "(default deepseek_v3 / gpt_oss) into DIR, its dequantized twin into DIR-reference, and run on it")
    p.add_argument("--block-size", nargs=2, type=int, default=[16, 16], metavar=("BN", "BK"),
                   help="weight_block_size of --make-checkpoint fp8-block (real checkpoints: 128 128)")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--backend", default="sim", help="sim (CPU), cuda_ipc, auto, ...")
    p.add_argument("--experts", type=int, default=5, help="routed experts of a tiny config")
    p.add_argument("--layers", type=int, default=2, help="decoder layers of a tiny config")
    p.add_argument("--dtype", default=None, help="model dtype (default: float32; bfloat16 with --cuda-graph, "
                   "which float32 experts cannot run under: their per-expert GEMMs read token counts on the host)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--prompt", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=None, help="max |logits diff| (default: 1e-4 fp32, 5e-2 else "
                   "and for quantized checkpoints)")
    p.add_argument("--cuda-graph", action="store_true", help="also capture one DWDP forward in a CUDA graph and "
                   "replay it on new inputs, each replay checked against an eager forward (CUDA only)")
    p.add_argument("--replays", type=int, default=20, help="replays of --cuda-graph")
    p.add_argument("--json", default=None)
    p.add_argument("--trace", metavar="FILE", default=None, help="write a Chrome-trace / Perfetto JSON of the "
                   "DWDP run's prefetches (compute stream, prefetch jobs, copies per peer; every rank)")
    p.add_argument("--telemetry", metavar="FILE", default=None, help="write the DWDP run's prefetch telemetry and "
                   "routing histograms as JSON")
    args = p.parse_args(argv)
    if args.make_checkpoint:
        if args.make_checkpoint[0] not in QUANT_FORMATS:
            raise SystemExit(f"--make-checkpoint: format {args.make_checkpoint[0]!r} is not one of "
                             f"{', '.join(QUANT_FORMATS)}")
        make_checkpoint(args)
    if args.checkpoint is None and args.model and os.path.isdir(args.model):
        args.checkpoint = args.model
    args.model = args.model or "mixtral"
    if args.cuda_graph and (args.backend == "sim" or not torch.cuda.is_available()):
        raise SystemExit(f"--cuda-graph: needs CUDA GPUs and a GPU backend (got --backend {args.backend}, "
                         f"torch.cuda.is_available() = {torch.cuda.is_available()})")
    if args.dtype is None:
        args.dtype = "bfloat16" if args.cuda_graph else "float32"
    if args.cuda_graph and args.dtype != "bfloat16":
        raise SystemExit(f"--cuda-graph: needs --dtype bfloat16 (got {args.dtype}): under capture the experts run "
                         "torch._grouped_mm's bf16 kernel; other dtypes need token counts on the host")
    # quantized experts compute with bf16 GEMM inputs: bf16's tolerance, as a bf16 model
    quantized = bool(args.checkpoint and os.path.isfile(os.path.join(args.checkpoint, "config.json"))
                     and _quantization(args.checkpoint))
    tol = args.tolerance if args.tolerance is not None else (1e-4 if args.dtype == "float32" and not quantized
                                                             else 5e-2)
    args.tol = tol
    res = dc.testing.launch(rank_main, args.world_size, args, backend=args.backend, timeout=600)
    _write_telemetry(args, [r.pop("telemetry") for r in res if r.get("telemetry") is not None])
    if args.backend != "sim" and torch.cuda.is_available() and args.world_size > torch.cuda.device_count():
        print(f"note: {args.world_size} ranks share {torch.cuda.device_count()} GPU(s): a functional check, "
              "speed and memory are not representative")
    for r in res:
        m = r["memory"]
        print(f"rank {r['rank']} [{r['backend']} {r['device']}] experts via {','.join(r['methods'])}: "
              f"HF {r['hf_tokens_per_s']:.1f} tok/s, DWDP {r['dwdp_tokens_per_s']:.1f} tok/s; expert memory "
              f"{_fmt_bytes(m['experts_bytes_before'])} -> {_fmt_bytes(m['experts_bytes_after'])} "
              f"(local {_fmt_bytes(m['local_bytes'])} + slots {_fmt_bytes(m['slot_bytes'])}"
              + (f", {_fmt_bytes(r['loading']['expert_bytes_read'])} of experts read from the checkpoint"
                 + (f" ({r['loading']['weight_format']}, scales included)"
                    if r["loading"]["weight_format"] != "bf16" else "") if r["loading"] else "") + "); "
              f"pulled {_fmt_bytes(r['bytes_pulled'])}, exposed prefetch {r['exposed_prefetch_s'] * 1e3:.2f} ms; "
              f"max |logits diff| {r['logits_max_diff']:.2e}, greedy tokens {'equal' if r['tokens_equal'] else 'DIFFER'}")
        gr = r["cuda_graph"]
        if gr:
            print(f"rank {r['rank']} CUDA graph: {gr['replays']} replays, max |replay - eager| "
                  f"{gr['max_replay_vs_eager']:.2e}; host per forward eager {gr['host_ms_eager']:.2f} ms, "
                  f"replay {gr['host_ms_replay']:.3f} ms")
    if args.json:
        with open(args.json, "w") as f:
            from dwdp_comm.bench import record
            json.dump({"record": {"date": record.utc_date(), "commit": record.commit(), "machine": record.machine_lines()},
                       "args": vars(args), "tolerance": tol, "per_rank": res}, f, indent=1)
    ok = all(r["logits_max_diff"] <= tol and r["tokens_equal"] and (r["cuda_graph"] or {"ok": True})["ok"]
             for r in res)
    print(f"check {'passed' if ok else 'FAILED'} (tolerance {tol:g} on logits, greedy tokens equal)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

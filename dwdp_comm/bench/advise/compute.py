"""What one layer's pieces cost: FLOPs over a calibrated rate, or timed on the local GPU."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from ...errors import bad_arg
from .shape import Load, MoEShape

__all__ = ["ComputeCosts", "modelled_compute", "measure_compute", "time_cuda", "time_cpu",
           "H200_EFFECTIVE_TFLOPS", "H200_INTERFERENCE", "INTERFERENCE_SOURCE", "FP8_GEMM_SPEEDUP"]

# One H200 ran 2 DeepSeek-V3 layers (MLA + MoE, bf16) for 16K tokens (two 8K prompts) in 146 ms
# (perf/sweep_deepseek.py, mode single): 24.7 TFLOP a layer by modelled_compute's count -> 338 TFLOPS.
H200_EFFECTIVE_TFLOPS = 338.0
# DWDP compute slowdown under a prefetch when none is measured here: a bf16 matmul under a
# batch/8 MiB peer pull, 2 x H200 (perf/results/gpu_copy_plane_h200x2.json, overlap, max over ranks).
H200_INTERFERENCE = 1.0303
INTERFERENCE_SOURCE = "committed 2 x H200 measurement (matmul under a batch/8 MiB pull, gpu_copy_plane_h200x2.json)"
# fp8 expert GEMMs: assumed 1.5x the bf16 rate (not measured here).
FP8_GEMM_SPEEDUP = 1.5


@dataclass
class ComputeCosts:
    """Seconds of one layer's pieces as functions of the token count (piecewise linear between
    measured points, or FLOPs over a rate).

    ``points`` maps a token count to ``{"attention_s", "experts_s", "other_s"}``; ``interference``
    multiplies DWDP's compute while a prefetch runs. ``source`` says "measured" or "modelled".
    """

    points: dict[int, dict[str, float]]
    interference: float = 1.0
    source: str = "modelled"
    interference_source: str = "assumed"
    notes: list[str] = field(default_factory=list)

    def at(self, tokens: float, part: str) -> float:
        ks = sorted(self.points)
        if len(ks) == 1:
            return self.points[ks[0]][part] * tokens / ks[0]
        lo, hi = (ks[0], ks[1]) if tokens <= ks[0] else (ks[-2], ks[-1])
        for a, b in zip(ks, ks[1:]):
            if a <= tokens <= b:
                lo, hi = a, b
                break
        ya, yb = self.points[lo][part], self.points[hi][part]
        return max(0.0, ya + (yb - ya) * (tokens - lo) / (hi - lo))


def _flops(shape: MoEShape, tokens: int, seq_lens: list[int]) -> dict[str, float]:
    si = shape.shared_intermediate or shape.moe_intermediate
    return {"attention": 2.0 * (tokens * shape.attention_params() + sum(shape.attention_core_macs(s) for s in seq_lens)),
            "experts": 6.0 * tokens * shape.top_k * shape.hidden * shape.moe_intermediate,
            "other": 6.0 * tokens * shape.num_shared_experts * shape.hidden * si + 2.0 * tokens * shape.hidden * shape.num_experts}


def modelled_compute(shape: MoEShape, token_counts: Sequence[int], load: Load, weights: str = "bf16",
                     tflops: float = H200_EFFECTIVE_TFLOPS, interference: float = H200_INTERFERENCE) -> ComputeCosts:
    """FLOPs over ``tflops`` (fp8 expert GEMMs ``FP8_GEMM_SPEEDUP`` faster) at each token count."""
    if not tflops > 0:
        raise bad_arg("tflops", tflops, "a rate > 0")
    pts = {}
    for t in sorted(set(int(x) for x in token_counts)):
        f = _flops(shape, t, load.seq_lens(t))
        e = f["experts"] / (FP8_GEMM_SPEEDUP if weights == "fp8" else 1.0)
        pts[t] = {"attention_s": f["attention"] / tflops / 1e12, "experts_s": e / tflops / 1e12,
                  "other_s": f["other"] / tflops / 1e12}
    return ComputeCosts(pts, interference, "modelled", INTERFERENCE_SOURCE,
                        notes=[f"FLOPs / {tflops:g} TFLOPS effective (calibrated to 2 DeepSeek-V3 "
                               f"layers, 16K tokens, 146 ms on one H200)"
                               + (f"; fp8 expert GEMMs assumed {FP8_GEMM_SPEEDUP}x bf16" if weights == "fp8" else "")])


def time_cuda(fn, iters: int = 3, warmup: int = 1) -> float:
    """Median seconds of ``fn`` by CUDA events on the current stream (blocking)."""
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return sorted(ts)[len(ts) // 2]


def time_cpu(fn, iters: int = 3, warmup: int = 1) -> float:
    import time
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def measure_compute(shape: MoEShape, token_counts: Sequence[int], load: Load, weights: str = "bf16",
                    copy_nbytes: int = 1 << 30, kernel_backend: str = "auto", seed: int = 0,
                    device: str | None = None) -> ComputeCosts:
    """Time one layer's pieces on the current CUDA device (blocking; a few seconds).

    ``device="cpu"`` runs the same code on the CPU (tiny shapes, for tests: the times are CPU
    times and no interference is measured).

    Experts: :func:`dwdp_comm.kernels.moe_mlp` over all ``num_experts`` experts (uniform routing,
    ``tokens x top_k`` rows). Attention: ``MLAttention`` (MLA) or torch SDPA (GQA) plus its
    projections. Other: the layer's two RMSNorms and residual adds, the router as the model runs
    it (DeepSeek-V3: float32 logits, group-limited top-k; GQA families: softmax top-k), permute,
    combine and the shared expert. Interference: the expert time again while a side stream copies ``copy_nbytes``
    device to device (to a peer GPU when there is one) in a loop.
    """
    import torch
    import torch.nn.functional as F

    from ... import kernels, moe
    on_cpu = device == "cpu"
    if not on_cpu and not torch.cuda.is_available():
        raise bad_arg("measure", "yes", "a CUDA device", "use --measure no (modelled compute) without a GPU")
    dev = torch.device("cpu") if on_cpu else torch.device("cuda", torch.cuda.current_device())
    timer = time_cpu if on_cpu else time_cuda
    g = torch.Generator(device=dev).manual_seed(seed)
    H, I, E, k = shape.hidden, shape.moe_intermediate, shape.num_experts, shape.top_k
    w13 = (torch.randn(E, H, 2 * I, device=dev, generator=g, dtype=torch.bfloat16) * H ** -0.5)
    w2 = (torch.randn(E, I, H, device=dev, generator=g, dtype=torch.bfloat16) * I ** -0.5)
    kw = {}
    if weights == "fp8":
        kw = dict(w13_scales=w13.float().abs().amax(1) / 448, w2_scales=w2.float().abs().amax(1) / 448)
        # stored [E, N, K] (K-contiguous, as torch._scaled_grouped_mm needs), passed as [E, K, N] views
        w13 = (w13.float() / kw["w13_scales"][:, None, :]).to(torch.float8_e4m3fn).transpose(1, 2).contiguous()
        w2 = (w2.float() / kw["w2_scales"][:, None, :]).to(torch.float8_e4m3fn).transpose(1, 2).contiguous()
        w13, w2 = w13.transpose(1, 2), w2.transpose(1, 2)
    if shape.attention == "mla":
        dcfg = moe.DEEPSEEK_V3.scaled(hidden=H, q_lora_rank=shape.q_lora_rank, kv_lora_rank=shape.kv_lora_rank,
                                      num_heads=shape.num_heads, qk_nope_dim=shape.qk_nope_dim,
                                      qk_rope_dim=shape.qk_rope_dim, v_head_dim=shape.v_head_dim,
                                      num_experts=E, moe_intermediate=I, top_k=k)
        att = moe.MLAttention(dcfg, moe.attention_weights(dcfg, seed, 0, device=dev, dtype=torch.bfloat16))
    else:
        hd, nh, nkv = shape.head_dim, shape.num_heads, shape.num_kv_heads
        wq = torch.randn(H, nh * hd, device=dev, dtype=torch.bfloat16, generator=g) * H ** -0.5
        wkv = torch.randn(H, 2 * nkv * hd, device=dev, dtype=torch.bfloat16, generator=g) * H ** -0.5
        wo = torch.randn(nh * hd, H, device=dev, dtype=torch.bfloat16, generator=g) * (nh * hd) ** -0.5

        def att(x, seq_lens):
            q, kv = x @ wq, x @ wkv
            outs, s0 = [], 0
            for n in seq_lens:
                qq = q[s0:s0 + n].view(n, nh, hd).transpose(0, 1)
                kk, vv = kv[s0:s0 + n].view(n, 2, nkv, hd).unbind(1)
                outs.append(F.scaled_dot_product_attention(qq, kk.transpose(0, 1), vv.transpose(0, 1), is_causal=True,
                                                           enable_gqa=True).transpose(0, 1).reshape(n, nh * hd))
                s0 += n
            return torch.cat(outs) @ wo
    si = shape.shared_intermediate or I
    ws = [torch.randn(H, 2 * si * shape.num_shared_experts, device=dev, dtype=torch.bfloat16, generator=g) * H ** -0.5,
          torch.randn(si * shape.num_shared_experts, H, device=dev, dtype=torch.bfloat16, generator=g) * si ** -0.5] \
        if shape.num_shared_experts else None
    # The router as the models run it: DeepSeek-V3 (MLA) float32 logits, group-limited sigmoid top-k;
    # GQA families (Qwen3-MoE) softmax top-k of the logits. Norm weights for the layer's two RMSNorms.
    grouped = shape.attention == "mla" and E % moe.DEEPSEEK_V3.num_groups == 0
    wr = torch.randn(E, H, device=dev, dtype=torch.float32 if grouped else torch.bfloat16, generator=g) * H ** -0.5
    rbias = torch.zeros(E, device=dev) if grouped else None
    norm_w = torch.ones(H, device=dev, dtype=torch.bfloat16)
    eps = moe.DEEPSEEK_V3.rms_eps
    pts = {}
    for t in sorted(set(int(x) for x in token_counts)):
        x = torch.randn(t, H, device=dev, dtype=torch.bfloat16, generator=g)
        rows = torch.randn(t * k, H, device=dev, dtype=torch.bfloat16, generator=g)
        m = torch.bincount(torch.randint(0, E, (t * k,), device=dev, generator=g), minlength=E).tolist()
        seq = load.seq_lens(t)
        with torch.no_grad():
            e_s = timer(lambda: kernels.moe_mlp(rows, m, w13, w2, backend=kernel_backend, **kw))
            a_s = timer(lambda: att(x, seq))

            def other():  # the layer's two RMSNorms and residual adds, router, permute, combine, shared expert
                h = x + moe.rms_norm(x, norm_w, eps)  # pre-attention norm and the residual add after it
                xn = moe.rms_norm(h, norm_w, eps)  # pre-MoE norm
                if grouped:
                    ids, wts = moe.route_deepseek(F.linear(xn.float(), wr), rbias, top_k=k,
                                                  num_groups=moe.DEEPSEEK_V3.num_groups,
                                                  topk_groups=moe.DEEPSEEK_V3.topk_groups)
                else:
                    wts, ids = F.linear(xn, wr).float().softmax(-1).topk(k, dim=-1)
                xs, _, order = moe.permute_tokens(xn, ids, E)
                y = moe.unpermute_tokens(xs, order, wts.to(xs.dtype))
                if ws is not None:
                    gu = xn @ ws[0]
                    y = y + (F.silu(gu[:, :gu.shape[1] // 2]) * gu[:, gu.shape[1] // 2:]) @ ws[1]
                return h + y  # the residual add after the MoE
            o_s = timer(other)
        pts[t] = {"attention_s": a_s, "experts_s": e_s, "other_s": o_s}
        del x, rows
    if on_cpu:
        return ComputeCosts(pts, H200_INTERFERENCE, "measured", INTERFERENCE_SOURCE + "; CPU run",
                            notes=["on the CPU (test run: CPU times)"])
    # interference: the largest point's experts under a looping side-stream copy
    t = max(pts)
    peer = torch.cuda.device_count() > 1
    src = torch.empty(copy_nbytes, dtype=torch.uint8, device=torch.device("cuda", 1) if peer else dev)
    dst = torch.empty(copy_nbytes, dtype=torch.uint8, device=dev)
    side = torch.cuda.Stream(device=dev)
    rows = torch.randn(t * k, H, device=dev, dtype=torch.bfloat16, generator=g)
    m = torch.bincount(torch.randint(0, E, (t * k,), device=dev, generator=g), minlength=E).tolist()
    alone = time_cuda(lambda: kernels.moe_mlp(rows, m, w13, w2, backend=kernel_backend, **kw))
    rate = 400e9 if peer else 2.5e12  # enough copies to outlast the compute
    n_copies = max(1, int(alone * rate / copy_nbytes) + 2)

    def busy():
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(n_copies):
                dst.copy_(src, non_blocking=True)
        kernels.moe_mlp(rows, m, w13, w2, backend=kernel_backend, **kw)
    with torch.no_grad():
        loaded = time_cuda(busy)
    torch.cuda.synchronize()
    slow = max(1.0, loaded / alone)
    if peer:
        factor, isrc = slow, f"measured: experts at {t} tokens under a concurrent peer pull"
    else:  # a local copy reads and writes HBM at ~2 TB/s, far more than a 400 GB/s pull: a bound only
        factor, isrc = H200_INTERFERENCE, (f"{INTERFERENCE_SOURCE}; a device-local copy measured here slowed the "
                                           f"experts {slow:.3f}x (an upper bound, not applied)")
    return ComputeCosts(pts, factor, "measured", interference_source=isrc,
                        notes=[f"on {torch.cuda.get_device_name(dev)} (kernels.moe_mlp backend "
                               f"{kernel_backend}, {'MLAttention' if shape.attention == 'mla' else 'torch SDPA'})"])


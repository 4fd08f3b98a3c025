"""``dwdp-bench advise``: will DWDP beat DEP for this model, group and load?

A per-rank, per-layer prediction (prefill, one MoE decoder layer repeated):

* **DWDP** (attention data parallel, every expert computed locally after a prefetch):
  ``layer = max(compute x interference, prefetch) + sync``; the part of the prefetch that compute
  does not hide is the *exposed* time. The prefetch time comes from the copy-plane contention model
  (:mod:`dwdp_comm.bench.model`, the ``full`` pattern: every rank pulls the other ranks' experts).
  Ranks do not wait for each other.
* **DEP** (attention data parallel, experts expert parallel): ``layer = max_r attention(T_r)``
  (every rank waits for the slowest at the dispatch) ``+ experts(mean routed rows) + all-to-all``
  (dispatch and combine, bf16 activations, at ``a2a_efficiency`` of the link).

Compute comes from one of two sources, stated in the result (``sources``):

* ``measured``: :func:`measure_compute` times, on the local GPU, the library's grouped GEMM
  (:func:`dwdp_comm.kernels.moe_mlp`) over all experts at the load's token counts, attention
  (:class:`dwdp_comm.moe.MLAttention` for MLA, torch SDPA for GQA) and the slowdown of that compute
  under a concurrent copy stream;
* ``modelled``: FLOPs over an effective rate, calibrated to the committed single-H200 measurement
  (``perf/sweep_deepseek.py`` ``single``: 146 ms an iteration for 2 DeepSeek-V3 layers at 16K
  tokens, i.e. :data:`H200_EFFECTIVE_TFLOPS`).

What is not modelled: expert hot spots (routing is assumed uniform), the shared expert's overlap,
HBM contention beyond the measured/assumed interference factor, NCCL all-to-all internals.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Sequence

from ..errors import InvalidArgumentError, bad_arg, bad_type
from . import model as M
from .patterns import make_plans, parse_schedule

__all__ = ["MoEShape", "PRESETS", "shape_from_hf_config", "get_shape", "Load", "load_from",
           "ComputeCosts", "modelled_compute", "measure_compute", "measure_pair_GBps", "fabric_for",
           "prefetch_seconds", "predict_point", "advise", "format_table", "plot_speedup", "H200_EFFECTIVE_TFLOPS",
           "H200_INTERFERENCE",
           "SCHEMA"]

SCHEMA = "dwdp-bench/advise/v1"

# One H200 ran 2 DeepSeek-V3 layers (MLA + MoE, bf16) for 16K tokens (two 8K prompts) in 146 ms
# (perf/sweep_deepseek.py, mode single): 24.7 TFLOP a layer by modelled_compute's count -> 338 TFLOPS.
H200_EFFECTIVE_TFLOPS = 338.0
# DWDP compute slowdown under a prefetch when none is measured here: a bf16 matmul under a
# batch/8 MiB peer pull, 2 x H200 (perf/results/gpu_copy_plane_h200x2.json, overlap, max over ranks).
H200_INTERFERENCE = 1.0303
_INTERFERENCE_SOURCE = "committed 2 x H200 measurement (matmul under a batch/8 MiB pull, gpu_copy_plane_h200x2.json)"
# fp8 expert GEMMs: assumed 1.5x the bf16 rate (not measured here).
FP8_GEMM_SPEEDUP = 1.5


# ---- model shape ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class MoEShape:
    """The numbers of one MoE decoder layer that decide its cost.

    Attributes
    ----------
    name : str
    hidden, moe_intermediate, num_experts, top_k : int
    num_shared_experts : int
        Shared experts (width ``shared_intermediate``, default ``moe_intermediate``).
    num_layers : int
        MoE layers of the model (memory per rank).
    attention : {"mla", "gqa"}
    num_heads, num_kv_heads, head_dim : int
        GQA: query heads, key/value heads, head size. MLA: ``num_heads`` only.
    q_lora_rank, kv_lora_rank, qk_nope_dim, qk_rope_dim, v_head_dim : int
        MLA only (DeepSeek-V3 names).
    """

    name: str
    hidden: int
    moe_intermediate: int
    num_experts: int
    top_k: int
    num_shared_experts: int = 0
    shared_intermediate: int | None = None
    num_layers: int = 1
    attention: str = "gqa"
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_dim: int = 0
    qk_rope_dim: int = 0
    v_head_dim: int = 0

    def __post_init__(self):
        for k in ("hidden", "moe_intermediate", "num_experts", "top_k", "num_layers", "num_heads"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad_arg(k, v, "an int >= 1")
        if self.top_k > self.num_experts:
            raise bad_arg("top_k", self.top_k, f"<= num_experts ({self.num_experts})")
        if self.attention not in ("mla", "gqa"):
            raise bad_arg("attention", self.attention, "'mla' or 'gqa'")
        if self.attention == "mla" and min(self.kv_lora_rank, self.qk_nope_dim + self.qk_rope_dim,
                                           self.v_head_dim) < 1:
            raise bad_arg("attention", "mla", "kv_lora_rank, qk_nope_dim + qk_rope_dim and v_head_dim >= 1")

    def expert_nbytes(self, weights: str) -> int:
        """Bytes of one routed expert's gate, up and down matrices (fp8: 1 byte a weight plus
        float32 per-channel scales)."""
        n = 3 * self.hidden * self.moe_intermediate
        if weights == "bf16":
            return 2 * n
        if weights == "fp8":
            return n + 4 * (2 * self.moe_intermediate + self.hidden)
        raise bad_arg("weights", weights, "'bf16' or 'fp8'")

    def attention_params(self) -> int:
        """Weights of the attention projections (multiply-adds per token)."""
        h, nh = self.hidden, self.num_heads
        if self.attention == "mla":
            qk = self.qk_nope_dim + self.qk_rope_dim
            q = h * self.q_lora_rank + self.q_lora_rank * nh * qk if self.q_lora_rank else h * nh * qk
            kv = h * (self.kv_lora_rank + self.qk_rope_dim) + self.kv_lora_rank * nh * (self.qk_nope_dim + self.v_head_dim)
            return q + kv + nh * self.v_head_dim * h
        hd = self.head_dim
        return h * nh * hd + 2 * h * self.num_kv_heads * hd + nh * hd * h

    def attention_core_macs(self, seq_len: int) -> float:
        """Multiply-adds of causal scores and values for one sequence of ``seq_len`` tokens."""
        if self.attention == "mla":
            per = self.qk_nope_dim + self.qk_rope_dim + self.v_head_dim
        else:
            per = 2 * self.head_dim
        return self.num_heads * per * seq_len * (seq_len + 1) / 2


def _deepseek_v3() -> MoEShape:
    from ..moe import DEEPSEEK_V3 as c
    return MoEShape(name="deepseek-v3", hidden=c.hidden, moe_intermediate=c.moe_intermediate,
                    num_experts=c.num_experts, top_k=c.top_k, num_shared_experts=c.num_shared_experts,
                    num_layers=58, attention="mla", num_heads=c.num_heads, q_lora_rank=c.q_lora_rank,
                    kv_lora_rank=c.kv_lora_rank, qk_nope_dim=c.qk_nope_dim, qk_rope_dim=c.qk_rope_dim,
                    v_head_dim=c.v_head_dim)


# Qwen3 MoE numbers from their published config.json files (Qwen/Qwen3-235B-A22B, Qwen/Qwen3-30B-A3B).
PRESETS = {
    "deepseek-v3": _deepseek_v3,
    "qwen3-235b-a22b": lambda: MoEShape(name="qwen3-235b-a22b", hidden=4096, moe_intermediate=1536, num_experts=128,
                                        top_k=8, num_layers=94, attention="gqa", num_heads=64, num_kv_heads=4,
                                        head_dim=128),
    "qwen3-30b-a3b": lambda: MoEShape(name="qwen3-30b-a3b", hidden=2048, moe_intermediate=768, num_experts=128,
                                      top_k=8, num_layers=48, attention="gqa", num_heads=32, num_kv_heads=4,
                                      head_dim=128),
}
PRESETS["qwen3-moe"] = PRESETS["qwen3-235b-a22b"]


def shape_from_hf_config(path_or_dict: str | dict) -> MoEShape:
    """A :class:`MoEShape` from a Hugging Face ``config.json`` (DeepSeek-V2/V3 or Qwen2/3-MoE keys)."""
    if isinstance(path_or_dict, dict):
        cfg, name = path_or_dict, "hf-config"
    else:
        try:
            with open(path_or_dict) as f:
                cfg = json.load(f)
        except (OSError, ValueError) as exc:
            raise bad_arg("model", path_or_dict, "a readable HF config.json", str(exc)) from None
        name = os.path.basename(os.path.dirname(os.path.abspath(path_or_dict))) or "hf-config"
    get = lambda *keys, default=None: next((cfg[k] for k in keys if cfg.get(k) is not None), default)
    experts = get("n_routed_experts", "num_experts", "num_local_experts")
    missing = [k for k, v in (("hidden_size", get("hidden_size")), ("moe_intermediate_size",
                                                                    get("moe_intermediate_size")),
                              ("n_routed_experts/num_experts", experts),
                              ("num_experts_per_tok", get("num_experts_per_tok"))) if v is None]
    if missing:
        raise bad_arg("model", path_or_dict if not isinstance(path_or_dict, dict) else "config",
                      "an MoE config.json", f"missing {', '.join(missing)}")
    layers = int(get("num_hidden_layers", default=1)) - int(get("first_k_dense_replace", default=0))
    mla = cfg.get("kv_lora_rank") is not None
    shared = int(get("n_shared_experts", default=0))
    shared_i = None
    if not shared and get("shared_expert_intermediate_size"):
        shared, shared_i = 1, int(cfg["shared_expert_intermediate_size"])
    heads = int(get("num_attention_heads", default=1))
    common = dict(name=str(get("_name_or_path", default=name)), hidden=int(cfg["hidden_size"]),
                  moe_intermediate=int(cfg["moe_intermediate_size"]), num_experts=int(experts),
                  top_k=int(cfg["num_experts_per_tok"]), num_shared_experts=shared, shared_intermediate=shared_i,
                  num_layers=max(layers, 1), num_heads=heads)
    if mla:
        return MoEShape(attention="mla", q_lora_rank=int(get("q_lora_rank", default=0) or 0),
                        kv_lora_rank=int(cfg["kv_lora_rank"]), qk_nope_dim=int(get("qk_nope_head_dim", default=0)),
                        qk_rope_dim=int(get("qk_rope_head_dim", default=0)), v_head_dim=int(get("v_head_dim", default=0)),
                        **common)
    hd = int(get("head_dim", default=int(cfg["hidden_size"]) // heads))
    return MoEShape(attention="gqa", num_kv_heads=int(get("num_key_value_heads", default=heads)), head_dim=hd, **common)


def get_shape(model: str | MoEShape | dict) -> MoEShape:
    """A preset name, a path to a config.json, a dict of :class:`MoEShape` fields, or a shape."""
    if isinstance(model, MoEShape):
        return model
    if isinstance(model, dict):
        try:
            return MoEShape(**{"name": "custom", **model})
        except TypeError as exc:
            raise bad_arg("model", model, "MoEShape fields", str(exc)) from None
    if not isinstance(model, str):
        raise bad_type("model", model, "str, dict or MoEShape")
    if model.lower() in PRESETS:
        return PRESETS[model.lower()]()
    if os.path.exists(model):
        return shape_from_hf_config(model)
    raise bad_arg("model", model, f"a preset in {sorted(PRESETS)} or a path to a HF config.json")


# ---- load -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Load:
    """Tokens each rank prefills in one iteration (``tokens[r]``), and the prompt length."""

    tokens: tuple[int, ...]
    seq_len: int | None = None  # None: one sequence per rank (its whole token count)

    @property
    def mean(self) -> float:
        return sum(self.tokens) / len(self.tokens)

    def seq_lens(self, t: int) -> list[int]:
        """``t`` tokens as back-to-back prompts of ``seq_len`` (the last one shorter)."""
        s = self.seq_len or t
        return [s] * (t // s) + ([t % s] if t % s else [])


def load_from(group_size: int, mean: float | None = None, cv: float = 0.0, tokens: Sequence[int] | None = None,
              seq_len: int | None = None) -> Load:
    """A deterministic load: ``tokens`` as given, or ``mean x (1 + cv z_r)`` with ``z_r`` the normal
    quantiles at ``(r + 0.5) / G`` (so the sample has the asked mean; clipped at 1 token)."""
    if tokens is not None:
        tokens = [int(t) for t in tokens]
        if len(tokens) != group_size or min(tokens) < 1:
            raise bad_arg("tokens", tokens, f"{group_size} token counts >= 1 (one per rank)")
        return Load(tuple(tokens), seq_len)
    if mean is None or not mean >= 1:
        raise bad_arg("mean", mean, "tokens per rank >= 1")
    if not cv >= 0:
        raise bad_arg("cv", cv, "a coefficient of variation >= 0")
    nd = NormalDist()
    z = [nd.inv_cdf((r + 0.5) / group_size) for r in range(group_size)] if group_size > 1 else [0.0]
    return Load(tuple(max(1, round(mean * (1 + cv * zr))) for zr in z), seq_len)


# ---- compute --------------------------------------------------------------------------------------
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
    return ComputeCosts(pts, interference, "modelled", _INTERFERENCE_SOURCE,
                        notes=[f"FLOPs / {tflops:g} TFLOPS effective (calibrated to 2 DeepSeek-V3 "
                               f"layers, 16K tokens, 146 ms on one H200)"
                               + (f"; fp8 expert GEMMs assumed {FP8_GEMM_SPEEDUP}x bf16" if weights == "fp8" else "")])


def _time_cuda(fn, iters: int = 3, warmup: int = 1) -> float:
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


def _time_cpu(fn, iters: int = 3, warmup: int = 1) -> float:
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

    from .. import kernels, moe
    on_cpu = device == "cpu"
    if not on_cpu and not torch.cuda.is_available():
        raise bad_arg("measure", "yes", "a CUDA device", "use --measure no (modelled compute) without a GPU")
    dev = torch.device("cpu") if on_cpu else torch.device("cuda", torch.cuda.current_device())
    timer = _time_cpu if on_cpu else _time_cuda
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
        return ComputeCosts(pts, H200_INTERFERENCE, "measured", _INTERFERENCE_SOURCE + "; CPU run",
                            notes=["on the CPU (test run: CPU times)"])
    # interference: the largest point's experts under a looping side-stream copy
    t = max(pts)
    peer = torch.cuda.device_count() > 1
    src = torch.empty(copy_nbytes, dtype=torch.uint8, device=torch.device("cuda", 1) if peer else dev)
    dst = torch.empty(copy_nbytes, dtype=torch.uint8, device=dev)
    side = torch.cuda.Stream(device=dev)
    rows = torch.randn(t * k, H, device=dev, dtype=torch.bfloat16, generator=g)
    m = torch.bincount(torch.randint(0, E, (t * k,), device=dev, generator=g), minlength=E).tolist()
    alone = _time_cuda(lambda: kernels.moe_mlp(rows, m, w13, w2, backend=kernel_backend, **kw))
    rate = 400e9 if peer else 2.5e12  # enough copies to outlast the compute
    n_copies = max(1, int(alone * rate / copy_nbytes) + 2)

    def busy():
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(n_copies):
                dst.copy_(src, non_blocking=True)
        kernels.moe_mlp(rows, m, w13, w2, backend=kernel_backend, **kw)
    with torch.no_grad():
        loaded = _time_cuda(busy)
    torch.cuda.synchronize()
    slow = max(1.0, loaded / alone)
    if peer:
        factor, isrc = slow, f"measured: experts at {t} tokens under a concurrent peer pull"
    else:  # a local copy reads and writes HBM at ~2 TB/s, far more than a 400 GB/s pull: a bound only
        factor, isrc = H200_INTERFERENCE, (f"{_INTERFERENCE_SOURCE}; a device-local copy measured here slowed the "
                                           f"experts {slow:.3f}x (an upper bound, not applied)")
    return ComputeCosts(pts, factor, "measured", interference_source=isrc,
                        notes=[f"on {torch.cuda.get_device_name(dev)} (kernels.moe_mlp backend "
                               f"{kernel_backend}, {'MLAttention' if shape.attention == 'mla' else 'torch SDPA'})"])


# ---- links and prefetch ---------------------------------------------------------------------------
def measure_pair_GBps(nbytes: int = 1 << 30) -> float | None:
    """GB/s of one ``nbytes`` copy from GPU 1 to GPU 0, or None without two GPUs (blocking)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda:1")
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
    with torch.cuda.device(0):
        s = _time_cuda(lambda: dst.copy_(src, non_blocking=True), iters=5)
    return nbytes / s / 1e9


def fabric_for(group_size: int, fabric: str = "auto", link_GBps: float | None = None) -> M.Fabric:
    """The calibrated fabric (``h200`` up to 8 GPUs, ``nvl72`` above, unless named), with its pair
    rate replaced by ``link_GBps`` when given (duplex scaled as calibrated: 386 / 394)."""
    name = fabric if fabric != "auto" else ("h200" if group_size <= 8 else "nvl72")
    if name not in ("h200", "nvl72"):
        raise bad_arg("fabric", fabric, "'auto', 'h200' or 'nvl72'")
    fab = M.h200(group_size) if name == "h200" else M.nvl72(group_size)
    if link_GBps is not None:
        if not link_GBps > 0:
            raise bad_arg("link_GBps", link_GBps, "a rate in GB/s > 0")
        e = link_GBps * 1e9
        fab = fab.with_(egress_Bps=e, ingress_Bps=e, duplex_Bps=2 * e * 386.0 / 394.0,
                        name=f"{fab.name}@{link_GBps:g}GB/s")
    return fab


def prefetch_seconds(fabric: M.Fabric, nbytes_per_source: int, schedule: str, chunk_nbytes: int,
                     engine_options: dict | None = None) -> float:
    """Time for every rank to pull ``nbytes_per_source`` from each peer (the contention model).

    ``engine_options`` as the GPU engine takes them (``api`` defaults to ``"batch"`` there too).
    """
    G = fabric.group_size
    if G < 2:
        return 0.0
    sch = parse_schedule(schedule)
    plans = make_plans("full", sch, G, nbytes_per_source, chunk_nbytes)
    base = dict(engine_options or {})
    if "api" not in base and not base.get("graph"):
        # the GPU engine's default api is batch (the model's is memcpy); a schedule that needs
        # single copies (graph) keeps its own
        try:
            return M.simulate(plans, fabric, options=sch.engine_options(G, {"api": "batch", **base})).makespan
        except InvalidArgumentError:
            pass
    return M.simulate(plans, fabric, options=sch.engine_options(G, base)).makespan


# ---- prediction -----------------------------------------------------------------------------------
def predict_point(shape: MoEShape, load: Load, costs: ComputeCosts, prefetch_s: float, link_Bps: float,
                  a2a_efficiency: float = 0.75, a2a_latency_s: float = 30e-6, sync_s: float = 10e-6) -> dict:
    """DWDP and DEP seconds per layer, per rank, and tokens/s/GPU, for one load.

    ``prefetch_s``: DWDP's pull of one layer's remote experts; ``link_Bps``: the pair rate the
    all-to-all runs at (times ``a2a_efficiency``), two all-to-alls (dispatch, combine) a layer.
    """
    G, T = len(load.tokens), load.tokens
    dw_rank, dw_exposed = [], []
    for t in T:
        c = (costs.at(t, "attention_s") + costs.at(t, "experts_s") + costs.at(t, "other_s")) * costs.interference
        dw_rank.append(max(c, prefetch_s) + sync_s)
        dw_exposed.append(max(0.0, prefetch_s - c))
    attn = [costs.at(t, "attention_s") + costs.at(t, "other_s") for t in T]
    mean_t = sum(T) / G
    experts = costs.at(mean_t, "experts_s")  # uniform routing: every rank gets the mean routed rows
    if G > 1:
        frac = (G - 1) / G
        send = max(T) * shape.top_k * frac * shape.hidden * 2
        recv = sum(T) * shape.top_k / G * frac * shape.hidden * 2
        a2a = 2 * (max(send, recv) / (link_Bps * a2a_efficiency) + a2a_latency_s)
    else:
        a2a = 0.0
    dep_layer = max(attn) + experts + a2a
    wait = [max(attn) - a for a in attn]
    dw_tps = sum(t / d for t, d in zip(T, dw_rank)) / G
    dep_tps = sum(T) / G / dep_layer
    return {"tokens": list(T), "mean_tokens": mean_t,
            "dwdp_layer_s": dw_rank, "dwdp_exposed_s": dw_exposed, "prefetch_s": prefetch_s,
            "dep_layer_s": dep_layer, "dep_all_to_all_s": a2a, "dep_wait_s": wait, "dep_experts_s": experts,
            "dwdp_tokens_per_s_per_gpu": dw_tps, "dep_tokens_per_s_per_gpu": dep_tps,
            "speedup": dw_tps / dep_tps}


def _memory(shape: MoEShape, G: int, weights: str, depth: int) -> dict:
    eb = shape.expert_nbytes(weights)
    local = -(-shape.num_experts // G)
    dep = local * eb * shape.num_layers
    slots = depth * (shape.num_experts - local) * eb if G > 1 else 0
    return {"expert_nbytes": eb, "local_experts": local, "dep_nbytes": dep, "dwdp_nbytes": dep + slots,
            "dwdp_slot_nbytes": slots}


def _breakeven(points: list[dict]) -> float | None:
    """Smallest mean tokens per rank at which DWDP's speedup reaches 1 (log-linear interpolation)."""
    for a, b in zip(points, points[1:]):
        if a["speedup"] < 1 <= b["speedup"]:
            la, lb = math.log(a["mean_tokens"]), math.log(b["mean_tokens"])
            return math.exp(la + (lb - la) * (1 - a["speedup"]) / (b["speedup"] - a["speedup"]))
    if points and points[0]["speedup"] >= 1:
        return points[0]["mean_tokens"]
    return None


def advise(model: str | MoEShape | dict = "deepseek-v3", group_size: int = 4, *, weights: str = "bf16",
           mean_tokens: float | None = 8192, cv: float = 0.2, cvs: Sequence[float] | None = None,
           tokens: Sequence[int] | None = None, seq_len: int | None = 8192,
           link_GBps: float | None = None, fabric: str = "auto", measure: str = "auto",
           tflops: float = H200_EFFECTIVE_TFLOPS, interference: float | None = None,
           schedules: Sequence[str] = ("round_robin", "parallel", "batch"), chunks: Sequence[int] = (8 << 20, 0),
           depths: Sequence[int] = (2, 3), sweep: Sequence[int] | None = None,
           a2a_efficiency: float = 0.75, kernel_backend: str = "auto") -> dict:
    """Predict DWDP against DEP (blocking; with ``measure`` it runs briefly on the local GPU).

    Parameters
    ----------
    model : str, dict or MoEShape
        A preset (:data:`PRESETS`), a HF ``config.json`` path, or :class:`MoEShape` fields.
    group_size : int
        Ranks of the DWDP group (= the DEP expert-parallel group).
    weights : {"bf16", "fp8"}
    mean_tokens, cv, tokens, seq_len
        The load (:func:`load_from`): per-rank tokens of one iteration, as prompts of ``seq_len``
        tokens (None: one prompt per rank).
    cvs : sequence of float, optional
        CVs of the sweep (default ``(0, cv)`` deduplicated).
    link_GBps : float, optional
        Pair copy rate; default: measured by a pair copy when two GPUs are visible (``measure``),
        else the calibrated fabric's.
    fabric : {"auto", "h200", "nvl72"}
    measure : {"auto", "yes", "no", "cpu"}
        Measure compute on the local GPU ("auto": when CUDA is available; "cpu": the same
        measurement on the CPU, for tests of tiny shapes).
    tflops, interference : modelled compute rate, and the DWDP compute slowdown under a prefetch
        (given overrides measured; default when not measured: H200_INTERFERENCE, the committed 2 x H200 figure).
    schedules, chunks, depths : candidates to choose from.
    sweep : token counts per rank of the speedup curve (default 512 .. 64K, powers of 2).

    Returns
    -------
    dict
        ``schema``, ``inputs``, ``sources`` (what was measured, given or modelled), ``choice``
        (schedule, chunk, depth, reason), ``point`` (the asked load, :func:`predict_point`),
        ``memory``, ``sweep`` (rows per CV and token count), ``breakeven_tokens`` (per CV).
    """
    shape = get_shape(model)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise bad_arg("group_size", group_size, "an int >= 1")
    if weights not in ("bf16", "fp8"):
        raise bad_arg("weights", weights, "'bf16' or 'fp8'")
    if measure not in ("auto", "yes", "no", "cpu"):
        raise bad_arg("measure", measure, "'auto', 'yes', 'no' or 'cpu'")
    if not 0 < a2a_efficiency <= 1:
        raise bad_arg("a2a_efficiency", a2a_efficiency, "a fraction in (0, 1]")
    if not depths or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in depths):
        raise bad_arg("depths", depths, "ints >= 1")
    if not schedules or not chunks:
        raise bad_arg("schedules/chunks", (schedules, chunks), "at least one of each")
    for s in schedules:
        parse_schedule(s)
    G = group_size
    load = load_from(G, mean_tokens, cv, tokens, seq_len)
    cvs = list(dict.fromkeys([0.0, float(cv)] if cvs is None else [float(c) for c in cvs]))
    sweep = sorted(set(int(s) for s in (sweep or [512 * 2 ** i for i in range(8)])))
    sweep_loads = {(c, s): load_from(G, s, c, None, seq_len) for c in cvs for s in sweep}
    counts = set(load.tokens)
    for ld in sweep_loads.values():
        counts.update(ld.tokens)
    sources = {}
    use_gpu = measure == "yes" or (measure == "auto" and _cuda())
    if use_gpu or measure == "cpu":
        # measure at a few anchors spanning every count; interpolate between them
        lo, hi = min(counts), max(counts)
        anchors = sorted({lo, hi, *load.tokens, *[a for a in sweep if lo <= a <= hi]})
        costs = measure_compute(shape, anchors, load, weights, kernel_backend=kernel_backend,
                                device="cpu" if measure == "cpu" else None)
    else:
        costs = modelled_compute(shape, sorted(counts), load, weights, tflops)
    sources["compute"] = costs.source + ": " + "; ".join(costs.notes)
    if interference is not None:
        if not interference >= 1:
            raise bad_arg("interference", interference, "a slowdown factor >= 1")
        costs.interference, costs.interference_source = float(interference), "given"
    sources["interference"] = f"{costs.interference:.3f} ({costs.interference_source})"
    measured_link = measure_pair_GBps() if (link_GBps is None and use_gpu) else None
    fab = fabric_for(G, fabric, link_GBps if link_GBps is not None else measured_link)
    sources["link"] = (f"given: {link_GBps:g} GB/s" if link_GBps is not None else
                       f"measured pair copy: {measured_link:.1f} GB/s" if measured_link else
                       f"calibrated fabric {fab.name}: {fab.pair_Bps / 1e9:.0f} GB/s pair ({fab.notes})")
    sources["prefetch"] = f"modelled: contention model (dwdp_comm.bench.model, per_stream executor) on {fab.name}"
    sources["all_to_all"] = f"modelled: bytes / ({a2a_efficiency:g} x pair rate) + 30 us, twice a layer"
    mem_any = _memory(shape, G, weights, 1)
    # a rank pulls the experts it lacks, (E - E/G) on average: E/G experts' bytes from each peer
    # (rounded down to 4 KiB; ceil(E/G) would over-count when G does not divide E)
    per_source = max(4096, shape.num_experts * mem_any["expert_nbytes"] // G // 4096 * 4096)
    cands = []
    for s in schedules:
        for c in chunks:
            cands.append({"schedule": s, "chunk_nbytes": int(c),
                          "prefetch_s": prefetch_seconds(fab, per_source, s, int(c))})
    # the fastest; among ties (within 0.5 %), the fewest copies (whole copies, then larger chunks)
    fastest = min(r["prefetch_s"] for r in cands)
    best = min((r for r in cands if r["prefetch_s"] <= fastest * 1.005),
               key=lambda r: (r["chunk_nbytes"] != 0, -r["chunk_nbytes"]))
    others = [r for r in cands if r is not best]
    pt = predict_point(shape, load, costs, best["prefetch_s"], fab.pair_Bps, a2a_efficiency)
    compute_min = min(d - e for d, e in zip(pt["dwdp_layer_s"], pt["dwdp_exposed_s"]))
    ratio = best["prefetch_s"] / compute_min
    hidden = ratio <= 1.0
    # a thin margin (ranks' compute varies by iteration) wants one more slot; a clear margin or a
    # bandwidth deficit does not (more slots cannot raise the copy rate)
    thin = 0.8 < ratio <= 1.0 and len(depths) > 1
    depth = sorted(depths)[1] if thin else min(depths)
    reason = (f"{best['schedule']} with {_chunk_text(best['chunk_nbytes'])} chunks pulls a layer's "
              f"{(G - 1) * per_source / 1e9:.2f} GB in {1e3 * best['prefetch_s']:.2f} ms"
              + (" (the fastest, or tied with the fewest copies; others: "
                 + ", ".join(f"{r['schedule']}/{_chunk_text(r['chunk_nbytes'])} {1e3 * r['prefetch_s']:.2f}"
                             for r in others) + " ms)" if others else " (the only candidate)") + "; "
              + (f"it hides under the shortest rank's compute ({1e3 * compute_min:.2f} ms) with a thin margin "
                 f"({100 * ratio:.0f} %), so depth {depth}: one more slot absorbs iteration-to-iteration jitter"
                 if thin else
                 f"it hides under the shortest rank's compute ({1e3 * compute_min:.2f} ms, {100 * ratio:.0f} %), so "
                 f"depth {depth} (the fewest slots) suffices" if hidden else
                 f"it exceeds the shortest rank's compute ({1e3 * compute_min:.2f} ms): exposed; depth {depth}, "
                 "since more slots cannot hide a bandwidth deficit (only more tokens per rank can)"))
    rows = []
    for c in cvs:
        for s in sweep:
            p = predict_point(shape, sweep_loads[(c, s)], costs, best["prefetch_s"], fab.pair_Bps, a2a_efficiency)
            rows.append({"cv": c, **p})
    be = {str(c): _breakeven([r for r in rows if r["cv"] == c]) for c in cvs}
    return {"schema": SCHEMA, "model": asdict(shape), "group_size": G, "weights": weights,
            "inputs": {"tokens": list(load.tokens), "cv": cv, "mean_tokens": load.mean, "seq_len": seq_len,
                       "fabric": fab.as_dict(), "a2a_efficiency": a2a_efficiency, "measure": measure},
            "sources": sources, "compute_points": {str(k): v for k, v in costs.points.items()},
            "interference": costs.interference, "candidates": cands,
            "choice": {"schedule": best["schedule"], "chunk_nbytes": best["chunk_nbytes"], "depth": depth,
                       "reason": reason},
            "point": pt, "memory": _memory(shape, G, weights, depth), "sweep": rows, "breakeven_tokens": be}


def _chunk_text(c: int) -> str:
    return "whole-copy" if c == 0 else f"{c >> 20} MiB" if c % (1 << 20) == 0 else f"{c} B"


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


# ---- text -----------------------------------------------------------------------------------------
_COLS = [("cv", "", 6), ("tok/rank", "", 9), ("compute", "(ms)", 9), ("prefetch", "(ms)", 9),
         ("exposed", "(ms)", 9), ("dwdp", "(ms)", 9), ("a2a", "(ms)", 9), ("wait", "(ms)", 9), ("dep", "(ms)", 9),
         ("dwdp", "(tok/s/GPU)", 12), ("dep", "(tok/s/GPU)", 12), ("speedup", "(x)", 8)]


def format_table(res: dict) -> str:
    """The nccl-tests style text: ``#`` preamble (inputs, sources, choice, memory), header, units, rows."""
    sh, G, mem, ch = res["model"], res["group_size"], res["memory"], res["choice"]
    out = [f"# dwdp-bench advise: DWDP against DEP, {sh['name']} ({sh['num_experts']} experts, top-{sh['top_k']}, "
           f"{sh['attention'].upper()}), {res['weights']} experts, group of {G}",
           f"# load: tokens per rank {res['inputs']['tokens']} (mean {res['inputs']['mean_tokens']:.0f}, cv "
           f"{res['inputs']['cv']:g})"]
    out += [f"# {k}: {v}" for k, v in res["sources"].items()]
    out += [f"# choice: schedule {ch['schedule']}, chunk {_chunk_text(ch['chunk_nbytes'])}, depth {ch['depth']}: "
            f"{ch['reason']}",
            f"# memory per rank (routed experts, {sh['num_layers']} layers): DEP {mem['dep_nbytes'] / 2**30:.1f} GiB; "
            f"DWDP {mem['dwdp_nbytes'] / 2**30:.1f} GiB ({mem['local_experts']} local experts a layer + "
            f"{ch['depth']} slots of {mem['dwdp_slot_nbytes'] / max(ch['depth'], 1) / 2**30:.2f} GiB)",
            "# times are per layer; compute, exposed and dwdp: the largest over ranks; wait: DEP's largest"]
    pt = res["point"]
    be = ", ".join(f"cv {c}: {'none in range' if v is None else f'{v:.0f}'}" for c, v in res["breakeven_tokens"].items())
    out.append(f"# asked load: DWDP {pt['dwdp_tokens_per_s_per_gpu']:.0f} tok/s/GPU, DEP "
               f"{pt['dep_tokens_per_s_per_gpu']:.0f}, speedup {pt['speedup']:.3f}; break-even tokens per rank: {be}")
    out.append("#" + "".join(f"{n:>{w}} " for n, _, w in _COLS)[1:].rstrip())
    out.append("#" + "".join(f"{u:>{w}} " for _, u, w in _COLS)[1:].rstrip())
    for r in res["sweep"]:
        comp = max(d - e for d, e in zip(r["dwdp_layer_s"], r["dwdp_exposed_s"]))
        vals = [f"{r['cv']:g}", str(round(r["mean_tokens"])), f"{1e3 * comp:.3f}", f"{1e3 * r['prefetch_s']:.3f}",
                f"{1e3 * max(r['dwdp_exposed_s']):.3f}", f"{1e3 * max(r['dwdp_layer_s']):.3f}",
                f"{1e3 * r['dep_all_to_all_s']:.3f}", f"{1e3 * max(r['dep_wait_s']):.3f}",
                f"{1e3 * r['dep_layer_s']:.3f}", f"{r['dwdp_tokens_per_s_per_gpu']:.0f}",
                f"{r['dep_tokens_per_s_per_gpu']:.0f}", f"{r['speedup']:.3f}"]
        out.append("".join(f"{v:>{w}} " for v, (_, _, w) in zip(vals, _COLS)).rstrip())
    return "\n".join(out)


def plot_speedup(res: dict, path: str) -> str:
    """Speedup against tokens per rank, one line per CV (needs matplotlib; ImportError otherwise)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for c in dict.fromkeys(r["cv"] for r in res["sweep"]):
        rs = [r for r in res["sweep"] if r["cv"] == c]
        ax.plot([r["mean_tokens"] for r in rs], [r["speedup"] for r in rs], marker="o", label=f"cv {c:g}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per rank")
    ax.set_ylabel("DWDP / DEP tokens/s/GPU")
    ax.set_title(f"{res['model']['name']}, G={res['group_size']}, {res['weights']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"

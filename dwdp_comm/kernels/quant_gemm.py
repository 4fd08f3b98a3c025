"""The quantized grouped GEMMs (``fp8_block``, ``mxfp4``): which path runs, and running it.

The paths:

``triton``
    The format's own kernel (:mod:`dwdp_comm.kernels.triton_quant`): block-FP8 on Hopper FP8
    tensor cores with the activations quantized per token and per 128 columns, or MXFP4 decoded in
    the kernel for a bf16 MMA. Weight pieces are read in place through a device table of expert
    addresses, so split weights need no host synchronisation either.
``cublas`` (``fp8_block`` only)
    One cuBLAS block-scaled ``torch._scaled_mm`` per expert (:mod:`dwdp_comm.kernels.cublas_fp8`):
    Hopper, 128 x 128 blocks, eager calls with many rows per expert (it reads the row bounds on the
    host: one host wait a call, one launch per expert). Weight pieces are read in place.
``dequantize``
    The weights dequantized into one bf16 ``[E, N, K]`` buffer
    (:func:`dwdp_comm.kernels.quant.dequantize`: one memory-bound Triton pass on CUDA), then the
    bf16 torch path: correct everywhere (CPU included), at the cost of the buffer (2 bytes a
    weight) and its write each call.

:func:`choose_path` is the rule. ``fp8_block``: ``cublas`` from :data:`FP8_CUBLAS_MIN_ROWS` mean rows
per expert (off until measured) where it runs and no CUDA graph capture is running, else ``triton`` wherever it runs
(Triton importable, CUDA sm89+, a power-of-two ``bk`` of at least 32). ``mxfp4``: ``triton`` while the mean rows per
expert stay below :data:`MXFP4_DEQUANT_MIN_ROWS` (memory-bound: the kernel reads 4-bit weights,
the fallback writes and reads 2 bytes a weight), ``dequantize`` from there (compute-bound: the
bf16 grouped GEMM of torch outruns a Triton kernel that decodes in its inner loop). Change the
constant after measuring (``perf/bench_quant_experts.py`` times both).

There is no grouped torch op for the block-FP8 recipe: ``torch._scaled_grouped_mm`` /
``torch.nn.functional.scaled_grouped_mm`` of torch 2.11 take tensor-wise and row-wise fp8 scales
on sm90 (and MX formats on sm100), not 1 x 128 activation and 128 x 128 weight blocks; the
single-GEMM ``torch._scaled_mm`` does (cuBLAS 12.9+, sm90), hence the per-expert ``cublas`` path.
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import BackendUnavailableError
from . import cublas_fp8, quant, torch_path, triton_quant
from .problem import Problem

__all__ = ["choose_path", "native_unavailable_reason", "run", "dequantized_problem", "PATHS",
           "MXFP4_DEQUANT_MIN_ROWS", "FP8_CUBLAS_MIN_ROWS"]

PATHS = ("triton", "cublas", "dequantize")

#: fp8_block: mean rows per expert from which the cuBLAS per-expert path runs instead of the Triton
#: kernel (eager calls on sm90). Off (infinite) until measured: this path has not run on a GPU yet
#: (no device could be started in the session that wrote it). Expected from the Triton kernel's
#: efficiency (perf/results/quant_experts_h100_r2.json: ~600 TFLOP/s on the gate-up GEMM at 512
#: rows, well below the FP8 tensor cores) and the host cost of one launch per expert (256 experts:
#: ~2 ms a projection, hidden behind ~10 ms of GPU work at 512 rows) to win from a few hundred rows.
#: perf/bench_quant_experts.py times both (ours_triton / ours_cublas) and tests/gpu/test_quant_gpu.py
#: checks it: set the bound from those numbers. On the H100 machines' torch 2.11 (cu130) the path does
#: not run: its probe fails ("Invalid scaling configuration"), and perf/probe_cublas_fp8.py found no
#: scale layout that torch 2.11's _scaled_mm takes for the 1x128 / 128x128 recipe
#: (perf/results/probe_cublas_fp8_h100_d135996.log), although torch 2.13's meta kernel accepts this one.
FP8_CUBLAS_MIN_ROWS = float("inf")

#: mxfp4: mean rows per expert from which the dequantize path runs instead of the Triton kernel.
#: Measured (H100, first run, GPT-OSS-120B shapes, old kernel and ~90 ms torch dequantize): the
#: kernel 3.6 / 7.0 / 22.8 ms at 4 / 32 / 128 rows against bf16's 2.6 / 2.9 / 5.1 ms; the one-pass
#: dequantize should cost ~3 ms (3.2G weights, 2.5 bytes each), so bf16 + 3 ms wins from about
#: 64 rows. Second run (round-2 kernels, one-pass Triton dequantize): at 128 rows the kernel took
#: 0.88x the dequantize path's time (with a tile 22 % slower than the rule's now), at 512 rows 1.47x
#: (dequantize + bf16: 16.0 ms; the kernel ~21 ms with the new tile): the switch lies in between.
MXFP4_DEQUANT_MIN_ROWS = 256


def native_unavailable_reason(fmt: str, device, block_size=quant.DEFAULT_BLOCK_SIZE) -> str | None:
    """None when ``fmt``'s own kernel runs on ``device`` (``fp8_block``, ``mxfp4``: Triton;
    ``fp8_channel``: ``torch._scaled_grouped_mm``; ``bf16``: always), else why not."""
    if fmt == "bf16":
        return None
    if fmt == "fp8_channel":
        from .capabilities import fp8_unavailable_reason
        return fp8_unavailable_reason(torch.device(device))
    if fmt == "fp8_block":
        bk = block_size[1]
        if bk < 32 or bk & (bk - 1):
            return f"block_size {tuple(block_size)}: the Triton kernel needs a power-of-two bk >= 32"
    return triton_quant.unavailable_reason(device, fmt)


def choose_path(fmt: str, device, rows_per_expert: float, block_size=quant.DEFAULT_BLOCK_SIZE,
                requested: str = "auto", *, n: int | None = None, k: int | None = None) -> tuple[str, str | None]:
    """``(path, why)``: the path of a ``fmt`` GEMM (:data:`PATHS`) and why it is not the format's
    own kernel (None when it is). ``requested``: ``"auto"`` (the rule), ``"triton"`` or ``"cublas"``
    (raise BackendUnavailableError where they cannot run) or ``"dequantize"``. ``n``, ``k``: the
    GEMM's output and reduction sizes (the ``cublas`` path needs them; without them it is not chosen)."""
    if requested == "dequantize":
        return "dequantize", "asked for"
    wants_cublas = requested == "cublas" or (requested == "auto" and rows_per_expert >= FP8_CUBLAS_MIN_ROWS)
    if fmt == "fp8_block" and wants_cublas:  # probed only when wanted (the probe waits for the device once)
        why_c = "N and K not given" if n is None or k is None else cublas_fp8.unavailable_reason(device, n, k, block_size)
        if why_c is None and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            why_c = "a CUDA graph capture is running (the path reads row bounds on the host)"
        if requested == "cublas":
            if why_c:
                raise BackendUnavailableError(f"fp8_block cuBLAS path: {why_c}")
            return "cublas", None
        if why_c is None:
            return "cublas", None
    why = native_unavailable_reason(fmt, device, block_size)
    if requested == "triton":
        if why:
            raise BackendUnavailableError(f"{fmt} Triton kernel: {why}")
        return "triton", None
    if why:
        return "dequantize", why
    if fmt == "mxfp4" and rows_per_expert >= MXFP4_DEQUANT_MIN_ROWS:
        return "dequantize", f"{rows_per_expert:.0f} rows per expert >= MXFP4_DEQUANT_MIN_ROWS"
    return "triton", None


def dequantized_problem(p: Problem) -> Problem:
    """``p`` with its weights dequantized into one bf16 buffer (logical ``[E, K, N]`` view)."""
    t0 = p.pieces[0][1].transpose(-1, -2)
    buf = torch.empty(p.num_experts, int(t0.shape[1]), p.K, dtype=torch.bfloat16, device=p.device)
    for (first, t), s in zip(p.pieces, p.scales):
        quant.dequantize(t.transpose(-1, -2), s, p.fmt, block_size=p.block_size, dtype=torch.bfloat16,
                         out=buf[first:first + int(t.shape[0])])
    return dataclasses.replace(p, pieces=[(0, buf.transpose(-1, -2))], scales=None, fmt="bf16",
                               out_dtype=torch.bfloat16)


def _one_scale(p: Problem) -> torch.Tensor:
    return p.scales[0] if len(p.scales) == 1 else torch.cat(p.scales)


def run(p: Problem, requested: str = "auto", info: dict | None = None, *, config=None,
        direct_min_rows: int = torch_path.DIRECT_MIN_ROWS) -> torch.Tensor:
    """Run an ``fp8_block`` / ``mxfp4`` problem on the path :func:`choose_path` gives.

    ``info`` receives ``backend`` (``"triton"`` or ``"torch"``), ``method`` (``"fp8_block"``,
    ``"mxfp4"`` or ``"dequantize+<torch method>"``), ``config`` (Triton) and ``fallback`` (why
    the format's kernel did not run). ``config``: a :class:`~dwdp_comm.kernels.triton_quant.Config`
    for the Triton kernel (benchmarks). Streams: the current stream; no host wait.
    """
    info = {} if info is None else info
    path, why = choose_path(p.fmt, p.device, p.num_tokens / max(1, p.num_experts), p.block_size, requested,
                            n=p.N, k=p.K)
    if why and path == "dequantize" and requested == "auto":
        info["fallback"] = why
    if p.num_tokens == 0:  # nothing to compute (e.g. a DEP rank that received no rows)
        info.update(backend="none", method="empty")
        return p.out if p.out is not None else torch.empty(0, p.N, dtype=p.out_dtype, device=p.device)
    if path == "dequantize" or p.fmt != "fp8_block":
        p = p.gathered()  # the fused gather: the block-FP8 quantizer only
    if path == "dequantize":
        q = dequantized_problem(p)
        res = torch_path.run(q, "auto", info, direct_min_rows=direct_min_rows)
        info.update(backend="torch", method="dequantize+" + info.get("method", "?"))
        return res
    if path == "cublas":  # one host read of the row bounds (a sync where they live on the device)
        info.update(backend="cublas", method="fp8_block")
        return cublas_fp8.gemm(p.x, p.groups.ends, p.pieces, _one_scale(p), rows=p.x_rows, top_k=p.x_top_k,
                               out=p.out)
    info["backend"] = "triton"
    info["method"] = p.fmt
    offs = p.groups.device_offsets(p.device)
    nk = [(first, t.transpose(-1, -2)) for first, t in p.pieces]
    if p.fmt == "fp8_block":
        xq, xs = triton_quant.quantize_act(p.x, p.block_size[1], rows=p.x_rows, num_rows=p.num_tokens,
                                           top_k=p.x_top_k, limit=offs[-1:])
        return triton_quant.fp8_block_gemm(xq, xs, nk, _one_scale(p), offs, block_size=p.block_size, out=p.out,
                                           config=config, info=info)
    return triton_quant.mxfp4_gemm(p.x, nk, _one_scale(p), offs, out=p.out, config=config, info=info)

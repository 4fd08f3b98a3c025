"""Triton kernels of the quantized expert GEMMs (CUDA; optional): block-FP8 and MXFP4 grouped GEMMs.

Token rows are grouped by expert in expert order (a sorted token batch) and every kernel reads the
groups' **device** end offsets: no host synchronisation anywhere, so a forward that uses them can
be captured in a CUDA graph. The M tiles of all experts form one list: a one-program kernel
(:func:`tile_ends`) turns the offsets into each expert's cumulative tile count, and each GEMM program
finds its expert by a binary search in it. The grid is sized from host shapes only
(``ceil(rows / BM) + E`` M tiles: an upper bound); programs past the last tile exit at once.

- :func:`quantize_act`: activations to fp8 e4m3 per row and per ``group`` columns (DeepSeek-V3's
  1 x 128 recipe: scale = amax / 448), optionally gathering the rows (``x[rows[r] // top_k]``,
  the token permutation fused in) and skipping rows past a device row count (sentinel tail).
- :func:`fp8_block_gemm`: ``out = xq @ w[e]^T`` per group with float32 accumulation, every
  ``BK = bk`` step scaled by the activation's group scale and the weight's block scale
  (``w [E, N, K]`` fp8 with ``[E, ceil(N/bn), ceil(K/bk)]`` float32 scales), bf16 out.
- :func:`mxfp4_gemm`: bf16 activations times MXFP4 weights (``[E, N, K/2]`` e2m1 pairs,
  ``[E, N, K/32]`` e8m0 scales) decoded to bf16 in registers (exact: e2m1 x 2^k fits bf16), bf16
  tensor-core MMA, float32 accumulation, bf16 out; in the direct order (``x @ w^T``) or swapped
  (``(w @ x^T)^T``, :attr:`Config.swap`: the decoded weights as the register operand of Hopper's wgmma).

Weights may be one ``[E, N, K]`` tensor (any expert stride) or pieces in separate allocations
(``[(first_expert, [count, N, K]), ...]``, the DWDP case): pieces go through a device table of
per-expert base addresses (built once per set of pieces and cached), read in place.

Tile configurations: :class:`Config`; the choice is :func:`choose_config` (a small rule on rows
per expert, N and K; no autotuning at call time) and any call takes ``config=`` to override it
(``perf/bench_quant_experts.py`` times the candidates of :data:`CANDIDATES`).

Triton is imported on first use (``import dwdp_comm`` never imports it). With ``TRITON_INTERPRET=1``
the kernels also run on CPU tensors (slowly): the CPU tests use that.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

import torch

from ..errors import BackendUnavailableError, GraphCaptureError

__all__ = ["Config", "CANDIDATES", "RULE", "choose_config", "dequantize", "unavailable_reason", "tile_ends", "quantize_act",
           "fp8_block_gemm", "mxfp4_gemm", "expert_table"]


@dataclass(frozen=True)
class Config:
    """One tile configuration: ``BM x BN`` output tiles, ``BK`` columns a step (fp8: the scale
    block ``bk``), ``GROUP_M`` M tiles side by side for L2 reuse, Triton's warps and stages.

    ``swap`` (mxfp4 only): the kernel computes the transposed tile (``w @ x^T``, the weights'
    ``BN`` rows as the MMA's M side, the tokens' ``BM`` rows as its N side), so the decoded weights
    are the MMA operand Hopper's wgmma reads from registers (W4A16 kernels do this); ``BN`` should
    then be a multiple of 64 (one warpgroup's M) and ``BM`` may be as small as 16.

    ``decode`` (mxfp4 only): ``"asm"`` decodes e2m1 with the kernel's PTX (about 3.5 instructions
    a value; CUDA and bf16 activations only), ``"triton"`` with Triton ops (the form the interpreter
    runs: elsewhere every config decodes so; ``info["decode"]`` says which ran)."""

    BM: int
    BN: int
    BK: int
    num_warps: int = 4
    num_stages: int = 3
    GROUP_M: int = 8
    swap: bool = False
    decode: str = "asm"

    def __post_init__(self):
        if self.decode not in ("asm", "triton"):
            raise ValueError(f"Config.decode: got {self.decode!r}, expected 'asm' or 'triton'")

    @property
    def name(self) -> str:
        return (f"{self.BM}x{self.BN}x{self.BK}w{self.num_warps}s{self.num_stages}" + ("-swap" if self.swap else "")
                + ("-tdec" if self.decode == "triton" else ""))


#: Candidates per kernel and regime (``small``: few rows per expert, memory-bound; ``large``:
#: compute-bound), all timed by ``perf/bench_quant_experts.py`` (which prints the winner per size).
CANDIDATES = {
    "fp8_block": {
        "small": [Config(16, 64, 128, 4, 4), Config(16, 128, 128, 4, 4), Config(32, 128, 128, 4, 3)],
        "medium": [Config(64, 128, 128, 4, 3), Config(64, 128, 128, 4, 4), Config(64, 256, 128, 8, 3)],
        "large": [Config(128, 128, 128, 8, 3), Config(128, 128, 128, 8, 4), Config(128, 128, 128, 4, 3),
                  Config(64, 128, 128, 4, 4, 32), Config(128, 256, 128, 8, 3)],
    },
    "mxfp4": {
        "small": [Config(16, 128, 128, 4, 3), Config(16, 64, 128, 4, 4), Config(32, 128, 64, 4, 3),
                  Config(16, 64, 128, 4, 4, swap=True), Config(16, 128, 128, 4, 3, swap=True),
                  Config(32, 128, 128, 8, 3, swap=True), Config(16, 64, 128, 4, 4, swap=True, decode="triton")],
        "medium": [Config(64, 128, 64, 4, 3), Config(64, 128, 128, 4, 3),
                   Config(64, 128, 64, 4, 3, swap=True), Config(64, 128, 128, 8, 3, swap=True),
                   Config(64, 128, 64, 4, 3, decode="triton"), Config(64, 128, 64, 4, 4), Config(64, 128, 64, 8, 3),
                   Config(64, 256, 64, 8, 3, swap=True)],
        "large": [Config(128, 256, 64, 8, 3), Config(128, 128, 64, 8, 3), Config(128, 128, 128, 8, 3),
                  Config(128, 256, 64, 8, 4), Config(128, 128, 64, 8, 3, swap=True),
                  Config(256, 128, 64, 8, 3, swap=True), Config(128, 256, 64, 8, 3, swap=True),
                  Config(128, 128, 128, 8, 4, swap=True), Config(128, 128, 64, 8, 3, decode="triton"),
                  Config(256, 128, 64, 8, 3, swap=True, decode="triton")],
    },
}

#: The rule, from measurements (H100, 2026-12-07, perf/results/quant_experts_h100_first.json): per
#: kernel, ``(max rows per expert, config)`` in increasing order; the first bound >= a call's mean
#: rows per expert picks. fp8_block (DeepSeek-V3 gate-up, N=4096, K=7168): 4 rows: 16x64x128w4s4
#: won (16x128 within 1 %); 128 rows: 64x128x128w4s3 won (128x128x128w8s3 +23 %, 128x256 2.8x).
#: Second run (same card, perf/results/quant_experts_h100_r2.json, the round-2 kernels): fp8_block at
#: 512 rows: 64x128x128w4s3 won again (12.9 ms; 128x128x128w8s4 15.3, 128x256x128w8s3 slower);
#: mxfp4 (GPT-OSS gate-up, N=5760, K=2880): 4 rows: 16x64x128w4s4 (1.21 ms; 16x128x128w4s3 1.37);
#: 128 rows: 128x128x64w8s3 (2.86 ms; 128x256x64w8s3 3.67); 512 rows: 128x128x64w8s3 (8.3 ms;
#: 128x256x64w8s3 10.8). Third run (same card, perf/results/quant_experts_gptoss_h100_88575a3.json,
#: the swapped order added): 4 rows: 16x64x128w4s4-swap 1.113 ms (the direct order 1.204); 128 rows:
#: 128x128x64w8s3 2.833 ms (best swapped 256x128x64w8s3-swap 3.216); 512 rows: 256x128x64w8s3-swap
#: 7.692 ms (128x128x64w8s3 8.223; the rule runs the dequantize path there, faster still).
#: Fourth run (same card, perf/results/quant_experts_gptoss_h100_a2087f1.json, the PTX decode): mxfp4
#: 4 rows: 16x128x128w4s3 0.692 ms (16x64x128w4s4-swap 0.728); 128 rows: 64x128x64w4s3 2.431 ms
#: (128x128x64w8s3 now 3.484: the even / odd split costs the direct order at 8 warps); 512 rows:
#: 128x128x64w8s3-swap 7.324 ms. fp8_block at 512 rows (one-scale tiles): 128x128x128w8s4 13.13 ms
#: (64x128x128w4s3 15.20). Fifth run (same card, perf/results/quant_experts_deepseek_h100_657ec46.json, the
#: scale loaded a step ahead): fp8_block 128 rows 128x128x128w8s4 4.196 ms (64x128x128w4s3 5.122), 512 rows
#: 11.28 (15.20): that tile from 48 rows. Bounds between measured sizes are guesses: re-measure, then edit here.
RULE = {
    "fp8_block": [(16, Config(16, 64, 128, 4, 4)), (48, Config(32, 128, 128, 4, 3)),
                  (float("inf"), Config(128, 128, 128, 8, 4))],
    "mxfp4": [(16, Config(16, 128, 128, 4, 3)), (256, Config(64, 128, 64, 4, 3)),
              (float("inf"), Config(128, 128, 64, 8, 3, swap=True))],
}

#: Rows per expert at or below which a call is "small", and from which it is "large" (the
#: candidate families the benchmark sweeps).
SMALL_ROWS, LARGE_ROWS = 24, 192


def regime(rows_per_expert: float) -> str:
    """``"small"``, ``"medium"`` or ``"large"`` for the mean rows per expert of a call."""
    if rows_per_expert <= SMALL_ROWS:
        return "small"
    return "large" if rows_per_expert >= LARGE_ROWS else "medium"


def choose_config(kind: str, rows_per_expert: float, n: int, k: int, block_k: int = 128) -> Config:
    """The tile configuration of a call (:data:`RULE`), fitted to ``n`` and, for fp8, ``BK = block_k``
    (the scale block). Change :data:`RULE` after measuring (``perf/bench_quant_experts.py``)."""
    c = next(cfg for bound, cfg in RULE[kind] if rows_per_expert <= bound)
    if n <= 64 and c.BN > 64:
        c = dataclasses.replace(c, BN=64)
    if kind == "fp8_block" and c.BK != block_k:
        c = dataclasses.replace(c, BK=block_k)
    return c


@functools.lru_cache(maxsize=None)
def _triton():
    """``(triton, tile_ends, quant, fp8_block, mxfp4)`` kernels, or the reason Triton cannot be imported."""
    try:
        import triton
        from . import triton_quant_kernels as k
    except Exception as exc:  # ImportError, or a broken install
        return f"triton is not importable: {type(exc).__name__}: {exc}"
    return triton, k.tile_ends_kernel, k.quant_kernel, k.fp8_block_kernel, k.mxfp4_kernel, k


#: Set False to make callers take their fallback (benchmarks, bisecting).
ENABLED = True


def unavailable_reason(device: torch.device, kind: str = "fp8_block") -> str | None:
    """None when the ``kind`` kernel (``"fp8_block"`` / ``"mxfp4"``) runs on ``device``, else why not."""
    if not ENABLED:
        return "dwdp_comm.kernels.triton_quant.ENABLED is False"
    device = torch.device(device)
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not interp:
        return f"{device.type} tensors (the Triton kernels run on CUDA; TRITON_INTERPRET=1 for tests)"
    got = _triton()
    if isinstance(got, str):
        return got
    if device.type == "cuda" and not interp:
        cap = _capability(device.index if device.index is not None else torch.cuda.current_device())
        if kind == "fp8_block" and cap < (8, 9):
            return f"fp8 tensor cores need sm89 or newer (this GPU is sm{cap[0]}{cap[1]})"
        if cap < (8, 0):
            return f"bf16 tensor cores need sm80 or newer (this GPU is sm{cap[0]}{cap[1]})"
    return None


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple:
    return torch.cuda.get_device_capability(index)


def _kernels():
    got = _triton()
    if isinstance(got, str):
        raise BackendUnavailableError(got)
    return got


def tile_ends(offsets: torch.Tensor, bm: int) -> torch.Tensor:
    """``[E]`` int32 cumulative ``ceil(rows_e / bm)`` from ``[E]`` int32 device end offsets (one program)."""
    triton, kern = _kernels()[:2]
    e = int(offsets.shape[0])
    out = torch.empty(e, dtype=torch.int32, device=offsets.device)
    kern[(1,)](offsets, out, e, BM=bm, BLOCK_E=triton.next_power_of_2(max(e, 2)), num_warps=4)
    return out


def quantize_act(x: torch.Tensor, group: int, *, rows: torch.Tensor | None = None, num_rows: int | None = None,
                 top_k: int = 1, limit: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 e4m3 activations per row and per ``group`` columns, optionally gathered.

    Parameters
    ----------
    x : torch.Tensor
        ``[T, K]`` bf16 / fp16 / float32, last dim contiguous.
    group : int
        Columns per scale (a power of two >= 16; 128 for DeepSeek-V3).
    rows, top_k : optional
        Gather: output row ``r`` is ``x[rows[r] // top_k]`` (``rows`` the sort order of the token
        copies, :class:`dwdp_comm.moe.TokenOrder`'s ``order``); ``num_rows`` defaults to ``len(rows)``.
    limit : torch.Tensor, optional
        One-element int device tensor: rows ``>= limit[0]`` are skipped (left unwritten).

    Returns
    -------
    xq : torch.Tensor
        ``[M, K]`` float8_e4m3fn (``M`` = rows of the result).
    scales : torch.Tensor
        ``[ceil(K / group), M]`` float32 (group-major: what the GEMM reads), ``x ~= xq * scale``
        per group; equal to :func:`dwdp_comm.kernels.reference.quantize_groupwise`'s, transposed.
    """
    triton, _, kern = _kernels()[:3]
    m = int(rows.shape[0]) if rows is not None and num_rows is None else int(num_rows or x.shape[0])
    k = int(x.shape[1])
    kb = -(-k // group)
    xq = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    xs = torch.empty(kb, m, dtype=torch.float32, device=x.device)
    if m == 0 or k == 0:
        return xq, xs
    assert x.stride(-1) == 1
    ng = max(1, min(8, 1024 // group, triton.next_power_of_2(kb)))
    dummy = torch.empty(1, dtype=torch.int32, device=x.device)
    kern[(m, triton.cdiv(kb, ng))](x, rows if rows is not None else dummy, xq, xs,
                                   limit if limit is not None else dummy, m, k, x.stride(0), top_k,
                                   HAS_ROWS=rows is not None, HAS_LIMIT=limit is not None, GROUP=group, NG=ng,
                                   num_warps=4)
    return xq, xs


_TABLES: dict = {}


def expert_table(pieces: list, device: torch.device) -> torch.Tensor | None:
    """``[E]`` int64 device table of each expert's offset in elements from the first piece's
    storage (cached per layout), or None where an offset is not a multiple of 16 elements.

    Offsets, not addresses: the kernels add them to the first piece's pointer with a
    ``tl.multiple_of(.., 16)`` hint, which keeps their 16-byte vector loads (a pointer built from
    a loaded address has no known alignment and drops every load to one element: 2-4x slower).
    The host builds the table once per set of pieces and uploads it from pinned memory without a
    sync; later calls (and CUDA graph captures, which need the eager warm-up call to have built
    it: GraphCaptureError otherwise) reuse the device table.
    """
    key = (str(device),) + tuple((t.data_ptr(), int(t.shape[0]), t.stride(0), t.element_size()) for _, t in pieces)
    hit = _TABLES.get(key)
    if hit is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise GraphCaptureError(
                "dwdp_comm.kernels.triton_quant: the first call on these weight pieces builds their expert "
                "offset table (pinned host memory), which a CUDA graph capture cannot contain; run the "
                "forward once eagerly before capturing (warm-up, as torch.cuda.graph asks)")
        base, size = pieces[0][1].data_ptr(), pieces[0][1].element_size()
        offs = [t.data_ptr() - base + i * t.stride(0) * t.element_size() for _, t in pieces for i in range(t.shape[0])]
        if any(o % (16 * size) for o in offs):
            hit = (None, None)
        else:
            host = torch.tensor([o // size for o in offs], dtype=torch.int64, pin_memory=device.type == "cuda")
            hit = (host, host.to(device, non_blocking=True))
        if len(_TABLES) > 256:
            _TABLES.clear()
        _TABLES[key] = hit
    return hit[1]


def _weights_args(pieces: list, device):
    """(w base tensor, offset table or None, expert stride) of ``[count, N, K]`` pieces."""
    t0 = pieces[0][1]
    for _, t in pieces[1:]:
        if t.stride()[1:] != t0.stride()[1:]:
            raise BackendUnavailableError("weight pieces with different [N, K] strides cannot share one kernel call")
    if len(pieces) == 1:
        return t0, None, t0.stride(0)
    table = expert_table(pieces, device)
    if table is None:
        raise BackendUnavailableError("weight pieces whose experts are not 16-element aligned relative to each "
                                      "other cannot share one kernel call")
    return t0, table, 0


def _log_e(e: int) -> int:
    return max(1, (max(e, 2) - 1).bit_length() + 1)


def _launch_grid(m: int, e: int, n: int, c: Config) -> tuple[int, int]:
    max_m_tiles = -(-m // c.BM) + e
    return max_m_tiles, max_m_tiles * -(-n // c.BN)


def fp8_block_gemm(xq: torch.Tensor, xs: torch.Tensor, pieces: list, scales: torch.Tensor,
                   offsets: torch.Tensor, *, block_size: tuple = (128, 128), out: torch.Tensor | None = None,
                   config: Config | None = None, info: dict | None = None) -> torch.Tensor:
    """Block-FP8 grouped GEMM: ``out[rows of e] = dequant(xq, xs) @ dequant(w[e], s[e])^T``.

    Parameters
    ----------
    xq, xs : torch.Tensor
        From :func:`quantize_act` with ``group = block_size[1]``: ``[M, K]`` fp8 rows grouped by
        expert, ``[ceil(K/bk), M]`` float32 scales.
    pieces : list of (int, torch.Tensor)
        The weights, ``[count, N, K]`` float8_e4m3fn storage per piece (K contiguous), covering
        experts ``0..E-1``.
    scales : torch.Tensor
        ``[E, ceil(N/bn), ceil(K/bk)]`` float32 (all experts, any strides).
    offsets : torch.Tensor
        ``[E]`` int32 device end offsets of the row groups (rows past ``offsets[-1]`` are not
        computed; their output rows are left unwritten).
    out : torch.Tensor, optional
        ``[M, N]`` bf16, last dim contiguous.
    config : Config, optional
        Default :func:`choose_config`.
    info : dict, optional
        Receives ``config`` (its name).

    Returns
    -------
    torch.Tensor
        ``[M, N]`` bf16, enqueued on the current stream; the host does not wait.
    """
    triton, _, _, kern = _kernels()[:4]
    m, k = int(xq.shape[0]), int(xq.shape[1])
    e, n = int(offsets.shape[0]), int(pieces[0][1].shape[1])
    bn, bk = block_size
    c = config or choose_config("fp8_block", m / max(e, 1), n, k, bk)
    if c.BK != bk:
        raise BackendUnavailableError(f"config {c.name}: BK must equal the scale block {bk}")
    if c.swap or c.decode != "asm":
        raise BackendUnavailableError(f"config {c.name}: the block-FP8 kernel has no swapped form or decode "
                                      "choice (mxfp4 only)")
    if info is not None:
        info["config"] = c.name
    if out is None:
        out = torch.empty(m, n, dtype=torch.bfloat16, device=xq.device)
    if m == 0:
        return out
    w0, table, stride_we = _weights_args(pieces, xq.device)
    tend = tile_ends(offsets, c.BM)
    max_m, grid = _launch_grid(m, e, n, c)
    kern[(grid,)](xq, xs, w0, table if table is not None else offsets, scales, offsets, tend, out,
                  m, n, k, e, max_m, stride_we, w0.stride(1), w0.stride(2), scales.stride(0), scales.stride(1),
                  scales.stride(2), out.stride(0), bn, BM=c.BM, BN=c.BN, BK=c.BK, GROUP_M=c.GROUP_M,
                  LOG_E=_log_e(e), USE_TABLE=table is not None, ONE_BS=bn % c.BN == 0, num_warps=c.num_warps,
                  num_stages=c.num_stages)
    return out


def mxfp4_gemm(x: torch.Tensor, pieces: list, scales: torch.Tensor, offsets: torch.Tensor, *,
               out: torch.Tensor | None = None, config: Config | None = None, info: dict | None = None
               ) -> torch.Tensor:
    """MXFP4 grouped GEMM: ``out[rows of e] = x[rows of e] @ dequant(w[e], s[e])^T`` (bf16 MMA).

    Parameters
    ----------
    x : torch.Tensor
        ``[M, K]`` bf16 rows grouped by expert, last dim contiguous.
    pieces : list of (int, torch.Tensor)
        ``[count, N, K / 2]`` uint8 per piece (two e2m1 values a byte, low nibble first).
    scales : torch.Tensor
        ``[E, N, K / 32]`` uint8 e8m0 (all experts, any strides).
    offsets, out, config, info
        As :func:`fp8_block_gemm`.

    Returns
    -------
    torch.Tensor
        ``[M, N]`` bf16, enqueued on the current stream; the host does not wait.
    """
    triton, kern = _kernels()[0], _kernels()[4]
    m, k = int(x.shape[0]), int(x.shape[1])
    e, n = int(offsets.shape[0]), int(pieces[0][1].shape[1])
    c = config or choose_config("mxfp4", m / max(e, 1), n, k)
    if c.BK % 32 or c.BK < 32:
        raise BackendUnavailableError(f"config {c.name}: BK must be a multiple of 32 (the mxfp4 scale group)")
    if info is not None:
        info["config"] = c.name
    if out is None:
        out = torch.empty(m, n, dtype=torch.bfloat16, device=x.device)
    if m == 0:
        return out
    assert x.stride(-1) == 1
    asm = c.decode == "asm" and x.device.type == "cuda" and x.dtype == torch.bfloat16
    if info is not None:
        info["decode"] = "asm" if asm else "triton"
    w0, table, stride_we = _weights_args(pieces, x.device)
    tend = tile_ends(offsets, c.BM)
    max_m, grid = _launch_grid(m, e, n, c)
    kern[(grid,)](x, x.stride(0), w0, table if table is not None else offsets, scales, offsets, tend, out,
                  n, k, e, max_m, stride_we, w0.stride(1), w0.stride(2), scales.stride(0), scales.stride(1),
                  scales.stride(2), out.stride(0), BM=c.BM, BN=c.BN, BK=c.BK, GROUP_M=c.GROUP_M,
                  LOG_E=_log_e(e), USE_TABLE=table is not None, SWAP=c.swap,
                  ASM=asm, num_warps=c.num_warps, num_stages=c.num_stages)
    return out


def dequantize(weight: torch.Tensor, scale: torch.Tensor, fmt: str, out: torch.Tensor,
               block_size: tuple = (128, 128)) -> torch.Tensor:
    """One memory-bound pass writing ``out`` ``[E, N, K]`` (bf16 / fp16 / float32) from quantized
    ``weight`` (``fp8_channel`` / ``fp8_block``: float8_e4m3fn ``[E, N, K]``; ``mxfp4``: uint8
    ``[E, N, K/2]``) and ``scale`` (as :mod:`dwdp_comm.kernels.quant` stores them; checked there).
    Same values as :func:`dwdp_comm.kernels.quant.dequantize`'s torch code (exact products,
    rounded once). Enqueued on the current stream; no host wait."""
    triton, k = _kernels()[0], _kernels()[5]
    e, n = int(weight.shape[0]), int(weight.shape[1])
    if e * n == 0 or out.numel() == 0:
        return out
    if weight.stride(-1) != 1 or out.stride(-1) != 1 or (fmt == "mxfp4" and scale.stride(-1) != 1):
        raise BackendUnavailableError("dequantize kernel: the last dims must be contiguous")
    br = 8
    if fmt == "mxfp4":
        kp = int(weight.shape[2])
        bc = 256
        k.dequant_mxfp4_kernel[(triton.cdiv(e * n, br), triton.cdiv(kp, bc))](
            weight, scale, out, e * n, n, kp, weight.stride(0), weight.stride(1), scale.stride(0), scale.stride(1),
            out.stride(0), out.stride(1), BR=br, BC=bc, num_warps=4)
        return out
    kk = int(weight.shape[2])
    if fmt == "fp8_channel":
        bn, bk, ss = 1, 1 << 30, (scale.stride(0), scale.stride(1), 0)
    else:
        (bn, bk), ss = block_size, (scale.stride(0), scale.stride(1), scale.stride(2))
    bc = 512
    k.dequant_fp8_kernel[(triton.cdiv(e * n, br), triton.cdiv(kk, bc))](
        weight, scale, out, e * n, n, kk, weight.stride(0), weight.stride(1), *ss, out.stride(0), out.stride(1),
        bn, bk, BR=br, BC=bc, num_warps=4)
    return out

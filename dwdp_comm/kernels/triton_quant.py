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
  tensor-core MMA, float32 accumulation, bf16 out.

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

import functools
import os
from dataclasses import dataclass

import torch

from ..errors import BackendUnavailableError

__all__ = ["Config", "CANDIDATES", "choose_config", "unavailable_reason", "tile_ends", "quantize_act",
           "fp8_block_gemm", "mxfp4_gemm", "expert_table"]


@dataclass(frozen=True)
class Config:
    """One tile configuration: ``BM x BN`` output tiles, ``BK`` columns a step (fp8: the scale
    block ``bk``), ``GROUP_M`` M tiles side by side for L2 reuse, Triton's warps and stages."""

    BM: int
    BN: int
    BK: int
    num_warps: int = 4
    num_stages: int = 3
    GROUP_M: int = 8

    @property
    def name(self) -> str:
        return f"{self.BM}x{self.BN}x{self.BK}w{self.num_warps}s{self.num_stages}"


#: Candidates per kernel and regime (``small``: few rows per expert, memory-bound; ``large``:
#: compute-bound). :func:`choose_config` picks one per call; benchmarks time all of them.
CANDIDATES = {
    "fp8_block": {
        "small": [Config(16, 128, 128, 4, 4), Config(16, 64, 128, 4, 4), Config(32, 128, 128, 4, 3)],
        "medium": [Config(64, 128, 128, 4, 3), Config(64, 256, 128, 8, 3)],
        "large": [Config(128, 128, 128, 8, 3), Config(128, 256, 128, 8, 3), Config(64, 128, 128, 4, 4)],
    },
    "mxfp4": {
        "small": [Config(16, 128, 128, 4, 3), Config(16, 64, 128, 4, 4), Config(32, 128, 64, 4, 3)],
        "medium": [Config(64, 128, 64, 4, 3), Config(64, 128, 128, 8, 3)],
        "large": [Config(128, 128, 64, 8, 3), Config(128, 256, 64, 8, 3), Config(128, 128, 128, 8, 2)],
    },
}

#: Rows per expert at or below which a call is "small", and from which it is "large".
SMALL_ROWS, LARGE_ROWS = 24, 192


def regime(rows_per_expert: float) -> str:
    """``"small"``, ``"medium"`` or ``"large"`` for the mean rows per expert of a call."""
    if rows_per_expert <= SMALL_ROWS:
        return "small"
    return "large" if rows_per_expert >= LARGE_ROWS else "medium"


def choose_config(kind: str, rows_per_expert: float, n: int, k: int, block_k: int = 128) -> Config:
    """The tile configuration of a call: the first candidate of its regime, fitted to ``n`` and, for
    fp8, ``BK = block_k`` (the scale block). Change the rule here after measuring
    (``perf/bench_quant_experts.py`` prints which candidate won per shape)."""
    c = CANDIDATES[kind][regime(rows_per_expert)][0]
    if n <= 64 and c.BN > 64:
        c = Config(c.BM, 64, c.BK, c.num_warps, c.num_stages, c.GROUP_M)
    if kind == "fp8_block" and c.BK != block_k:
        c = Config(c.BM, c.BN, block_k, c.num_warps, c.num_stages, c.GROUP_M)
    return c


@functools.lru_cache(maxsize=None)
def _triton():
    """``(triton, tile_ends, quant, fp8_block, mxfp4)`` kernels, or the reason Triton cannot be imported."""
    try:
        import triton
        from . import triton_quant_kernels as k
    except Exception as exc:  # ImportError, or a broken install
        return f"triton is not importable: {type(exc).__name__}: {exc}"
    return triton, k.tile_ends_kernel, k.quant_kernel, k.fp8_block_kernel, k.mxfp4_kernel


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
        cap = torch.cuda.get_device_capability(device)
        if kind == "fp8_block" and cap < (8, 9):
            return f"fp8 tensor cores need sm89 or newer (this GPU is sm{cap[0]}{cap[1]})"
        if cap < (8, 0):
            return f"bf16 tensor cores need sm80 or newer (this GPU is sm{cap[0]}{cap[1]})"
    return None


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


def expert_table(pieces: list, device: torch.device) -> torch.Tensor:
    """``[E]`` int64 device table of each expert's base address in ``pieces`` (cached per layout).

    The host builds it once per set of pieces (addresses, counts, expert strides) and uploads it
    from pinned memory without a sync (a memcpy node when a CUDA graph captures; the pinned copy is
    kept with it, so a replay reads the same bytes).
    """
    key = (str(device),) + tuple((t.data_ptr(), int(t.shape[0]), t.stride(0), t.element_size()) for _, t in pieces)
    hit = _TABLES.get(key)
    if hit is None:
        addrs = [t.data_ptr() + i * t.stride(0) * t.element_size() for _, t in pieces for i in range(t.shape[0])]
        host = torch.tensor(addrs, dtype=torch.int64, pin_memory=device.type == "cuda")
        hit = (host, host.to(device, non_blocking=True))
        if len(_TABLES) > 256:
            _TABLES.clear()
        _TABLES[key] = hit
    return hit[1]


def _weights_args(pieces: list, device):
    """(w base tensor, table or None, expert stride, n stride, k stride) of ``[count, N, K]`` pieces."""
    t0 = pieces[0][1]
    for _, t in pieces[1:]:
        if t.stride()[1:] != t0.stride()[1:]:
            raise BackendUnavailableError("weight pieces with different [N, K] strides cannot share one kernel call")
    if len(pieces) == 1:
        return t0, None, t0.stride(0)
    return t0, expert_table(pieces, device), 0


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
    triton, _, _, kern, _ = _kernels()
    m, k = int(xq.shape[0]), int(xq.shape[1])
    e, n = int(offsets.shape[0]), int(pieces[0][1].shape[1])
    bn, bk = block_size
    c = config or choose_config("fp8_block", m / max(e, 1), n, k, bk)
    if c.BK != bk:
        raise BackendUnavailableError(f"config {c.name}: BK must equal the scale block {bk}")
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
                  LOG_E=_log_e(e), USE_TABLE=table is not None, num_warps=c.num_warps, num_stages=c.num_stages)
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
    triton, _, _, _, kern = _kernels()
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
    w0, table, stride_we = _weights_args(pieces, x.device)
    tend = tile_ends(offsets, c.BM)
    max_m, grid = _launch_grid(m, e, n, c)
    kern[(grid,)](x, x.stride(0), w0, table if table is not None else offsets, scales, offsets, tend, out,
                  n, k, e, max_m, stride_we, w0.stride(1), w0.stride(2), scales.stride(0), scales.stride(1),
                  scales.stride(2), out.stride(0), BM=c.BM, BN=c.BN, BK=c.BK, GROUP_M=c.GROUP_M,
                  LOG_E=_log_e(e), USE_TABLE=table is not None, num_warps=c.num_warps, num_stages=c.num_stages)
    return out

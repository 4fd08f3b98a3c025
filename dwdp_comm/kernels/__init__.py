"""Grouped GEMM over split expert weights, and the MoE MLP built on it.

A DWDP rank computes every expert of a layer, but each expert's weights live either in local
memory (its shard) or in a prefetch slot. These functions read both in place, never merging them:

- one ``[E, K, N]`` tensor: contiguous, or a composite view (one virtual range mapped onto the
  local shard and the slot pages, :meth:`dwdp_comm.PrefetchHandle.weights`);
- split weights: ``(first_expert, tensor[count, K, N])`` segments
  (:meth:`dwdp_comm.PrefetchHandle.weight_segments`), or a list of per-expert ``[K, N]`` /
  per-owner ``[count, K, N]`` tensors in expert order.

Backends (``backend=``):

``"reference"``
    One matmul per expert in float64: the oracle. Any device, any strides, fp8 included.
``"torch"``
    ``torch._grouped_mm`` (one call on a single tensor or composite view; one call per piece on
    split weights), ``torch._scaled_grouped_mm`` for fp8, per-expert ``torch.mm`` where those
    cannot run. Force a method with ``"torch:grouped_mm"``, ``"torch:segments"``,
    ``"torch:segments_async"``, ``"torch:segments_direct"``, ``"torch:per_expert"`` (see
    :mod:`dwdp_comm.kernels.torch_path`).
``"numba"``
    A Numba CUDA kernel reading per-expert weight pointers (split weights natively), on a GPU or
    in the CUDA simulator. ``"numba:<config>"`` picks a tile shape
    (:data:`dwdp_comm.kernels.numba_grouped.CONFIGS`). bf16 and float32 only.
``"triton"``
    ``fp8_block`` / ``mxfp4`` weights only: their Triton kernels (:mod:`dwdp_comm.kernels.quant_gemm`).
``"auto"`` (default)
    ``"torch"``; for per-channel fp8 where ``torch._scaled_grouped_mm`` cannot run, ``"reference"``;
    for ``fp8_block`` / ``mxfp4`` the Triton kernel where it runs, else dequantize + ``"torch"``.

Pass ``info={}`` to learn what ran: ``info["backend"]``, ``info["method"]`` and, where a fallback
happened, ``info["fallback"]`` (why).

Layout convention: weights are logically ``[E, K, N]`` and ``out_e = x_e @ w[e]``. Row-major
``[E, K, N]`` is the native layout; ``[E, N, K]`` storage passed as ``w.transpose(-1, -2)`` works
too and is required for fp8. Token rows of ``x`` are grouped by expert, in expert order.

Numba is imported only when the Numba backend runs (``import dwdp_comm.kernels`` never imports it).

Modules (this package only re-exports their public names):

=========================  ==================================================================
``dispatch``               :func:`grouped_gemm`, :func:`available_backends`: validate, pick a
                           backend, run
``moe_mlp``                :func:`moe_mlp`, :func:`swiglu`, the gates
``token_groups``           :class:`TokenGroups`: rows per expert, host arrays, device offsets
``problem``                :func:`make_problem`, ``Problem``, weight pieces and scales
``capabilities``           probes: what ``torch._grouped_mm`` / ``_scaled_grouped_mm`` run here
``torch_path``             the torch backend: ``choose_method``, ``split_strategy``, ``run``
``segments``               the split-weights engine of the torch path
``workers``                ``WorkerStreams``: worker CUDA streams forked from the caller's
``reference``              the float64 oracle, ``quantize_rowwise``
``numba_grouped``          the Numba CUDA kernel (imported on first use)
``triton_moe``             fused Triton activation and row combine
``quant``                  quantized weight formats (``WEIGHT_FORMATS``), checks, ``dequantize``
``quant_gemm``             the ``fp8_block`` / ``mxfp4`` GEMM: path rule, Triton, cuBLAS or dequantize
``cublas_fp8``             the block-FP8 GEMM as one cuBLAS ``torch._scaled_mm`` per expert (sm90)
``triton_quant``           the Triton block-FP8 / MXFP4 grouped GEMMs (imported on first use)
``triton_route``           fused Triton route-permute of small batches (sort, offsets, gather)
=========================  ==================================================================
"""

from __future__ import annotations

from . import quant, triton_moe  # noqa: F401  (dwdp_comm.kernels.quant / triton_moe, used by dwdp_comm.moe)
from .dispatch import BACKENDS, available_backends, grouped_gemm
from .moe_mlp import GATES, WEIGHT_LAYOUTS, is_silu, moe_mlp, swiglu
from .problem import Problem, make_problem, normalize_weights  # noqa: F401
from .quant import WEIGHT_FORMATS, UnsupportedFormatError, dequantize
from .reference import quantize_rowwise
from .token_groups import TokenGroups
from .torch_path import DIRECT_MIN_ROWS  # noqa: F401

__all__ = ["grouped_gemm", "moe_mlp", "swiglu", "available_backends", "TokenGroups", "make_problem",
           "quantize_rowwise", "is_silu", "BACKENDS", "GATES", "WEIGHT_LAYOUTS", "normalize_weights", "WEIGHT_FORMATS",
           "UnsupportedFormatError", "dequantize"]

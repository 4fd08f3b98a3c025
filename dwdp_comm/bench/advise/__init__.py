"""``dwdp-bench advise``: will DWDP beat DEP for this model, group and load?

A per-rank, per-layer prediction (prefill, one MoE decoder layer repeated):

* **DWDP** (attention data parallel, every expert computed locally after a prefetch):
  ``layer = max(compute x interference, prefetch) + sync``; the part of the prefetch that compute
  does not hide is the *exposed* time. The prefetch time comes from the copy-plane contention model
  (:mod:`dwdp_comm.bench.model`, the ``full`` pattern: every rank pulls the other ranks' experts).
  Ranks do not wait for each other.
* **DEP** (attention data parallel, experts expert parallel): ``layer = max_r attention(T_r)``
  (every rank waits for the slowest at the dispatch) ``+ experts(the busiest owner's routed rows) +
  all-to-all`` (dispatch and combine, bf16 activations, at ``a2a_efficiency`` of the link).
* **Hot-expert replication**, with a routing histogram (``routing=``, :mod:`.routing`): the hottest
  experts of each layer replicated by prefetch, the rest expert parallel (:mod:`.hot`), with its
  memory and the load below which DEP wins.

The fabric (:mod:`dwdp_comm.bench.fabric`) is the preset of the GPU this process sees, a named
preset, or a file measured by ``dwdp-bench calibrate --write``; the result says which and why.

Compute comes from one of two sources, stated in the result (``sources``):

* ``measured``: :func:`measure_compute` times, on the local GPU, the library's grouped GEMM
  (:func:`dwdp_comm.kernels.moe_mlp`) over all experts at the load's token counts, attention
  (:class:`dwdp_comm.moe.MLAttention` for MLA, torch SDPA for GQA) and the slowdown of that compute
  under a concurrent copy stream;
* ``modelled``: FLOPs over an effective rate, calibrated to the committed single-H200 measurement
  (``perf/sweep_deepseek.py`` ``single``: 146 ms an iteration for 2 DeepSeek-V3 layers at 16K
  tokens, i.e. :data:`H200_EFFECTIVE_TFLOPS`).

What is not modelled: expert hot spots without a histogram (routing is then uniform), expert
placement other than the contiguous split, the shared expert's overlap, HBM contention beyond the
measured/assumed interference factor, NCCL all-to-all internals.
"""

from __future__ import annotations

from .compute import (FP8_GEMM_SPEEDUP, H200_EFFECTIVE_TFLOPS, H200_INTERFERENCE, ComputeCosts, measure_compute,
                      modelled_compute)
from .hot import hot_replication
from .layer import expert_parallel_layer, predict_point
from .predict import SCHEMA, advise, choose_fabric_for, fabric_for, measure_pair_GBps, prefetch_seconds
from .routing import RoutingHistogram, load_routing
from .shape import PRESETS, Load, MoEShape, get_shape, load_from, shape_from_hf_config
from .table import format_table, plot_speedup

__all__ = ["MoEShape", "PRESETS", "shape_from_hf_config", "get_shape", "Load", "load_from",
           "ComputeCosts", "modelled_compute", "measure_compute", "measure_pair_GBps", "fabric_for",
           "prefetch_seconds", "predict_point", "advise", "format_table", "plot_speedup", "H200_EFFECTIVE_TFLOPS",
           "H200_INTERFERENCE", "FP8_GEMM_SPEEDUP", "SCHEMA", "choose_fabric_for", "expert_parallel_layer",
           "RoutingHistogram", "load_routing", "hot_replication"]

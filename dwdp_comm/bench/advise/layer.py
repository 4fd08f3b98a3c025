"""One MoE layer's time under DWDP and under expert parallelism (DEP), and the memory per rank.

Pure formulas over :class:`~dwdp_comm.bench.advise.compute.ComputeCosts` (no model of the copy
plane here: the prefetch time comes in as a number).

* DWDP, per rank: ``max(compute x interference, prefetch) + sync``; ranks do not wait for each other.
* Expert parallel (:func:`expert_parallel_layer`), one synchronous layer for every rank:
  ``max_r(attention_r + other_r + local experts_r) + experts of the busiest owner + all-to-all``.
  DEP is the case with no local experts; routing is uniform (every owner gets ``1 / G`` of the
  routed rows) unless owner shares from a routing histogram are given. Hot-expert replication
  (:mod:`~dwdp_comm.bench.advise.hot`) is the case where the hot experts' rows stay local.
"""

from __future__ import annotations

import math
from typing import Sequence

from .compute import ComputeCosts
from .shape import Load, MoEShape

__all__ = ["predict_point", "expert_parallel_layer", "memory_per_rank", "breakeven_tokens"]


def expert_parallel_layer(shape: MoEShape, tokens: Sequence[int], costs: ComputeCosts, link_Bps: float, *,
                          owner_shares: Sequence[float] | None = None, local_share: float = 0.0,
                          interference: float = 1.0, a2a_efficiency: float = 0.75,
                          a2a_latency_s: float = 30e-6) -> dict:
    """Seconds of one synchronous expert-parallel layer.

    Parameters
    ----------
    tokens : sequence of int
        Tokens of each rank (``G`` of them).
    owner_shares : sequence of float, optional
        ``G`` fractions of all routed rows that each owner rank computes for the group (they sum
        to ``1 - local_share``); None: uniform, ``(1 - local_share) / G`` each.
    local_share : float
        Fraction of every rank's routed rows computed where the token is (replicated experts).
    interference : float
        Slowdown of all compute (a prefetch runs under it).
    link_Bps, a2a_efficiency, a2a_latency_s
        The all-to-all (dispatch and combine, bf16 rows) at ``a2a_efficiency x link_Bps``.

    Returns
    -------
    dict
        ``layer_s``, ``all_to_all_s``, ``experts_s`` (the busiest owner's), ``local_experts_s``
        (per rank), ``wait_s`` (per rank: for the slowest to reach the dispatch), ``owner_skew``
        (the busiest owner's rows over the mean owner's).
    """
    G, T, k = len(tokens), list(tokens), shape.top_k
    ep = 1.0 - local_share
    if owner_shares is None:
        ep_tokens = sum(T) / G if local_share == 0 else sum(T) * ep / G  # the busiest owner's rows / k
        skew = 1.0
    else:
        ep_tokens = max(owner_shares) * sum(T)
        skew = max(owner_shares) * G / ep if ep > 0 else 1.0
    local = [costs.at(t * local_share, "experts_s") * interference if local_share > 0 else 0.0 for t in T]
    pre = [(costs.at(t, "attention_s") + costs.at(t, "other_s")) * interference + lo for t, lo in zip(T, local)]
    experts = costs.at(ep_tokens, "experts_s") * interference if ep > 0 else 0.0
    if G > 1 and ep > 0:
        frac = (G - 1) / G
        send = max(T) * k * ep * frac * shape.hidden * 2
        # (the uniform DEP case keeps its historical expression: the same floats as before histograms)
        busiest_rows = sum(T) * k / G if owner_shares is None and local_share == 0 else ep_tokens * k
        recv = busiest_rows * frac * shape.hidden * 2
        a2a = 2 * (max(send, recv) / (link_Bps * a2a_efficiency) + a2a_latency_s)
    else:
        a2a = 0.0
    return {"layer_s": max(pre) + experts + a2a, "all_to_all_s": a2a, "experts_s": experts, "local_experts_s": local,
            "wait_s": [max(pre) - p for p in pre], "owner_skew": skew}


def predict_point(shape: MoEShape, load: Load, costs: ComputeCosts, prefetch_s: float, link_Bps: float,
                  a2a_efficiency: float = 0.75, a2a_latency_s: float = 30e-6, sync_s: float = 10e-6,
                  owner_shares: Sequence[Sequence[float]] | None = None) -> dict:
    """DWDP and DEP seconds per layer, per rank, and tokens/s/GPU, for one load.

    ``prefetch_s``: DWDP's pull of one layer's remote experts; ``link_Bps``: the pair rate the
    all-to-all runs at (times ``a2a_efficiency``), two all-to-alls (dispatch, combine) a layer.
    ``owner_shares``: per MoE layer, the ``G`` owners' shares of the routed rows under DEP's
    contiguous split (a routing histogram); DEP's times are then the mean over those layers.
    None: uniform routing.
    """
    G, T = len(load.tokens), load.tokens
    dw_rank, dw_exposed = [], []
    for t in T:
        c = (costs.at(t, "attention_s") + costs.at(t, "experts_s") + costs.at(t, "other_s")) * costs.interference
        dw_rank.append(max(c, prefetch_s) + sync_s)
        dw_exposed.append(max(0.0, prefetch_s - c))
    mean_t = sum(T) / G
    per_layer = [expert_parallel_layer(shape, T, costs, link_Bps, owner_shares=sh, a2a_efficiency=a2a_efficiency,
                                       a2a_latency_s=a2a_latency_s) for sh in (owner_shares or [None])]
    n = len(per_layer)
    dep_layer = sum(d["layer_s"] for d in per_layer) / n
    a2a = sum(d["all_to_all_s"] for d in per_layer) / n
    experts = sum(d["experts_s"] for d in per_layer) / n
    wait = per_layer[0]["wait_s"]  # the attention's: the same in every layer
    dw_tps = sum(t / d for t, d in zip(T, dw_rank)) / G
    dep_tps = sum(T) / G / dep_layer
    out = {"tokens": list(T), "mean_tokens": mean_t,
           "dwdp_layer_s": dw_rank, "dwdp_exposed_s": dw_exposed, "prefetch_s": prefetch_s,
           "dep_layer_s": dep_layer, "dep_all_to_all_s": a2a, "dep_wait_s": wait, "dep_experts_s": experts,
           "dwdp_tokens_per_s_per_gpu": dw_tps, "dep_tokens_per_s_per_gpu": dep_tps,
           "speedup": dw_tps / dep_tps}
    if owner_shares is not None:
        out["dep_owner_skew"] = sum(d["owner_skew"] for d in per_layer) / n
    return out


def memory_per_rank(shape: MoEShape, G: int, weights: str, depth: int) -> dict:
    """Routed-expert bytes per rank, all layers: DEP (its shard) and DWDP (shard + ``depth`` slots)."""
    eb = shape.expert_nbytes(weights)
    local = -(-shape.num_experts // G)
    dep = local * eb * shape.num_layers
    slots = depth * (shape.num_experts - local) * eb if G > 1 else 0
    return {"expert_nbytes": eb, "local_experts": local, "dep_nbytes": dep, "dwdp_nbytes": dep + slots,
            "dwdp_slot_nbytes": slots}


def breakeven_tokens(points: list[dict], key: str = "speedup") -> float | None:
    """Smallest mean tokens per rank at which ``points[i][key]`` (a ratio against DEP, ascending
    ``mean_tokens``) reaches 1 (log-linear interpolation); the first point if it is already there."""
    for a, b in zip(points, points[1:]):
        if a[key] < 1 <= b[key]:
            la, lb = math.log(a["mean_tokens"]), math.log(b["mean_tokens"])
            return math.exp(la + (lb - la) * (1 - a[key]) / (b[key] - a[key]))
    if points and points[0][key] >= 1:
        return points[0]["mean_tokens"]
    return None

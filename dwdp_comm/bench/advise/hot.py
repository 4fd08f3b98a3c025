"""The third answer beside DEP and full DWDP: replicate only the hottest experts.

Given a routing histogram (:mod:`~dwdp_comm.bench.advise.routing`), for ``H`` hot experts per
layer (that layer's ``H`` most routed):

* the hot experts are **replicated by prefetch**, as DWDP replicates every expert: each rank pulls,
  layer ahead, the hot experts it does not own into ``depth`` slots, and computes the rows of its
  own tokens that chose them where the tokens are (no all-to-all for those rows, no hot spot);
* the other experts stay **expert parallel**, as in DEP, on DEP's contiguous split
  (:class:`dwdp_comm.layout.ExpertLayout`): the rows routed to them go through the all-to-all to
  their owner, so the layer stays synchronous (ranks wait for the slowest at the dispatch).

Per layer and rank (:func:`~dwdp_comm.bench.advise.layer.expert_parallel_layer` with the hot rows
local): ``max(max_r(attention_r + other_r + hot experts_r) + cold experts of the busiest owner +
all-to-all of the cold rows, prefetch of the hot experts)``, compute slowed by the interference
factor while the prefetch runs. The prefetch time is the contention model's full exchange with
every source sending the busiest owner's hot bytes (an upper bound when the hot experts are spread
unevenly over owners, exact when even). Memory per rank: DEP's shard (its hot and cold experts)
plus ``depth`` slots of the hot experts it lacks.

It pays when routing is skewed: a few experts carry many rows, so pulling them is cheap and takes
both their rows off the all-to-all and their hot spot off DEP's busiest owner. Below some load the
prefetch no longer hides under the compute and DEP wins; on a flat histogram the hot experts carry
few rows and it never beats DEP by more than noise (the answer says so).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from ...errors import bad_arg
from ...layout import ExpertLayout
from .compute import ComputeCosts
from .layer import breakeven_tokens, expert_parallel_layer
from .routing import RoutingHistogram
from .shape import Load, MoEShape

__all__ = ["HotLayer", "dep_owner_shares", "hot_layers", "hot_point", "hot_memory", "hot_replication",
           "default_candidates"]


@dataclass(frozen=True)
class HotLayer:
    """One layer under hot-expert replication.

    Attributes
    ----------
    hot : tuple of int
        The hot experts (global ids, most routed first).
    hot_share : float
        Their fraction of the layer's routed rows.
    cold_owner_shares : tuple of float
        Per owner rank, its cold experts' fraction of all routed rows.
    hot_owned : tuple of int
        Per rank, how many of the hot experts it owns.
    """

    hot: tuple
    hot_share: float
    cold_owner_shares: tuple
    hot_owned: tuple


def _owners(num_experts: int, G: int) -> list[int]:
    lay = ExpertLayout(num_experts, G, 0)
    return [r for r in range(G) for _ in lay.experts_of(r)]


def dep_owner_shares(hist: RoutingHistogram, G: int) -> list[list[float]]:
    """Per layer, each rank's share of the routed rows under DEP's contiguous split."""
    own = _owners(hist.num_experts, G)
    out = []
    for layer in hist.layers:
        sh = [0.0] * G
        for e, p in enumerate(hist.shares(layer)):
            sh[own[e]] += p
        out.append(sh)
    return out


def hot_layers(hist: RoutingHistogram, G: int, H: int) -> list[HotLayer]:
    """Each layer's ``H`` hottest experts (ties: the lower id), their share, and what stays expert parallel."""
    if isinstance(H, bool) or not isinstance(H, int) or not 0 <= H <= hist.num_experts:
        raise bad_arg("hot_experts", H, f"an int in [0, {hist.num_experts}]")
    own = _owners(hist.num_experts, G)
    out = []
    for layer in hist.layers:
        p = hist.shares(layer)
        hot = tuple(sorted(range(len(p)), key=lambda e: (-p[e], e))[:H])
        hs = set(hot)
        cold = [0.0] * G
        owned = [0] * G
        for e, pe in enumerate(p):
            if e in hs:
                owned[own[e]] += 1
            else:
                cold[own[e]] += pe
        out.append(HotLayer(hot, sum(p[e] for e in hot), tuple(cold), tuple(owned)))
    return out


def hot_point(shape: MoEShape, load: Load, costs: ComputeCosts, layers: Sequence[HotLayer], prefetch_s: float,
              link_Bps: float, a2a_efficiency: float = 0.75) -> dict:
    """Hot-expert replication at one load: seconds per layer (mean over the histogram's layers) and tokens/s/GPU.

    Returns
    -------
    dict
        ``layer_s``, ``exposed_s`` (prefetch beyond the layer's compute and all-to-all),
        ``all_to_all_s``, ``cold_experts_s``, ``owner_skew`` (busiest cold owner over the mean),
        ``hot_share``, ``prefetch_s``, ``tokens_per_s_per_gpu``.
    """
    T = load.tokens
    inter = costs.interference if prefetch_s > 0 else 1.0
    rows = []
    for hl in layers:
        ep = expert_parallel_layer(shape, T, costs, link_Bps, owner_shares=hl.cold_owner_shares,
                                   local_share=hl.hot_share, interference=inter, a2a_efficiency=a2a_efficiency)
        rows.append((max(ep["layer_s"], prefetch_s), max(0.0, prefetch_s - ep["layer_s"]), ep))
    n = len(rows)
    layer_s = sum(r[0] for r in rows) / n
    return {"mean_tokens": load.mean, "layer_s": layer_s, "exposed_s": sum(r[1] for r in rows) / n,
            "all_to_all_s": sum(r[2]["all_to_all_s"] for r in rows) / n,
            "cold_experts_s": sum(r[2]["experts_s"] for r in rows) / n,
            "owner_skew": sum(r[2]["owner_skew"] for r in rows) / n,
            "hot_share": sum(hl.hot_share for hl in layers) / n, "prefetch_s": prefetch_s,
            "tokens_per_s_per_gpu": load.mean / layer_s}


def hot_memory(shape: MoEShape, G: int, weights: str, depth: int, layers: Sequence[HotLayer]) -> dict:
    """Routed-expert bytes per rank over all the model's layers (the busiest rank of each kind).

    ``sharded_nbytes``: DEP's shard (``ceil(E / G)`` experts a layer, hot and cold); ``slot_nbytes``:
    ``depth`` slots each holding the hot experts a rank lacks (``H -`` the fewest it owns, over layers);
    ``total_nbytes``: their sum. ``hot_owned_max``: the most hot experts one rank owns in a layer.
    """
    eb = shape.expert_nbytes(weights)
    local = -(-shape.num_experts // G)
    H = len(layers[0].hot) if layers else 0
    lack = max(H - min(hl.hot_owned) for hl in layers) if layers and G > 1 else 0
    sharded = local * eb * shape.num_layers
    slots = depth * lack * eb
    return {"expert_nbytes": eb, "hot_experts": H, "local_experts": local,
            "hot_owned_max": max(max(hl.hot_owned) for hl in layers) if layers else 0,
            "slot_experts": lack, "sharded_nbytes": sharded, "slot_nbytes": slots, "total_nbytes": sharded + slots}


def default_candidates(num_experts: int) -> list[int]:
    """Hot-set sizes tried: 1, 2, 4, ... up to half the experts."""
    out, h = [], 1
    while h <= num_experts // 2:
        out.append(h)
        h *= 2
    return out or [1]


def hot_replication(shape: MoEShape, load: Load, costs: ComputeCosts, hist: RoutingHistogram, *,
                    prefetch: Callable[[int], float], link_Bps: float, weights: str, depth: int, cv: float,
                    point: dict, sweep: Sequence[tuple], a2a_efficiency: float = 0.75,
                    candidates: Sequence[int] | None = None) -> dict:
    """The hot-expert answer: the best hot-set size at the asked load, its speed, memory, and the load
    below which DEP wins.

    Parameters
    ----------
    prefetch : callable
        Bytes each rank pulls from each peer -> seconds (the chosen schedule on the fabric).
    cv : float
        The asked load's CV (the one whose minimum load the reason states).
    point : dict
        :func:`~dwdp_comm.bench.advise.layer.predict_point` at the asked load (DEP from the same
        histogram, and DWDP).
    sweep : sequence of (cv, Load, dict)
        The sweep: each load with its ``predict_point`` row, ascending tokens within a CV.
    candidates : sequence of int, optional
        Hot-set sizes (default :func:`default_candidates`).

    Returns
    -------
    dict
        ``candidates`` (per size: hot share, prefetch, tokens/s/GPU), ``hot_experts`` (chosen),
        ``point`` (:func:`hot_point` at the asked load), ``memory`` (:func:`hot_memory`),
        ``answer`` (``"dep"``, ``"dwdp"`` or ``"hot"``: the fastest at the asked load), ``sweep``
        (per row: hot tokens/s/GPU and the ratios to DEP and DWDP), ``min_tokens`` (per CV: where it
        starts to beat DEP, None if nowhere in the sweep), ``best_range`` (per CV: the sweep's
        loads where it is the fastest of the three), ``reason``.
    """
    G = len(load.tokens)
    if G < 2:
        raise bad_arg("group_size", G, ">= 2 for hot-expert replication (one rank has nothing to replicate)")
    eb = shape.expert_nbytes(weights)
    sizes = sorted(set(int(h) for h in (candidates or default_candidates(shape.num_experts))))
    if not sizes or sizes[0] < 1 or sizes[-1] >= shape.num_experts:
        raise bad_arg("hot_experts", sizes, f"sizes in [1, {shape.num_experts - 1}]")
    cands = []
    for H in sizes:
        layers = hot_layers(hist, G, H)
        per_source = max(4096, -(-max(max(hl.hot_owned) for hl in layers) * eb // 4096) * 4096)
        pf = prefetch(per_source)
        hp = hot_point(shape, load, costs, layers, pf, link_Bps, a2a_efficiency)
        cands.append({"hot_experts": H, "hot_share": hp["hot_share"], "per_source_nbytes": per_source,
                      "prefetch_s": pf, "tokens_per_s_per_gpu": hp["tokens_per_s_per_gpu"], "_layers": layers})
    best_tps = max(c["tokens_per_s_per_gpu"] for c in cands)
    best = min((c for c in cands if c["tokens_per_s_per_gpu"] >= best_tps * 0.995), key=lambda c: c["hot_experts"])
    layers, pf = best.pop("_layers"), best["prefetch_s"]
    for c in cands:
        c.pop("_layers", None)
    hp = hot_point(shape, load, costs, layers, pf, link_Bps, a2a_efficiency)
    tps = {"dep": point["dep_tokens_per_s_per_gpu"], "dwdp": point["dwdp_tokens_per_s_per_gpu"],
           "hot": hp["tokens_per_s_per_gpu"]}
    answer = max(tps, key=lambda k: (tps[k], k == "dep"))  # ties go to DEP: no prefetch, no slots
    rows = []
    for c, ld, r in sweep:
        h = hot_point(shape, ld, costs, layers, pf, link_Bps, a2a_efficiency)
        rows.append({"cv": c, "mean_tokens": r["mean_tokens"], "hot_tokens_per_s_per_gpu": h["tokens_per_s_per_gpu"],
                     "hot_vs_dep": h["tokens_per_s_per_gpu"] / r["dep_tokens_per_s_per_gpu"],
                     "hot_vs_dwdp": h["tokens_per_s_per_gpu"] / r["dwdp_tokens_per_s_per_gpu"],
                     "hot_exposed_s": h["exposed_s"]})
    cvs = list(dict.fromkeys(r["cv"] for r in rows))
    min_tokens = {str(c): breakeven_tokens([r for r in rows if r["cv"] == c], "hot_vs_dep") for c in cvs}
    best_range = {str(c): [r["mean_tokens"] for r in rows
                           if r["cv"] == c and r["hot_vs_dep"] > 1 and r["hot_vs_dwdp"] > 1] for c in cvs}
    mem = hot_memory(shape, G, weights, depth, layers)
    uniform = best["hot_experts"] / shape.num_experts
    head = (f"the {best['hot_experts']} hottest experts of each layer carry {100 * hp['hot_share']:.1f} % of the "
            f"routed rows (uniform routing: {100 * uniform:.1f} %); pulling them takes {1e3 * pf:.2f} ms a layer"
            + (f", {1e3 * hp['exposed_s']:.2f} ms of it exposed" if hp["exposed_s"] > 0 else ", hidden under the layer")
            + f"; the rest stay expert parallel, busiest owner {hp['owner_skew']:.2f}x the mean (DEP: "
            f"{point.get('dep_owner_skew', 1.0):.2f}x)")
    cv_key = str(float(cv))
    mt = min_tokens.get(cv_key)
    first = next((r["mean_tokens"] for r in rows if str(r["cv"]) == cv_key), None)
    floor = ("no sweep at the asked CV" if cv_key not in min_tokens else
             f"DEP wins at every load of the sweep (cv {cv_key}): hot-expert replication never beats it here"
             if mt is None else
             f"below {mt:.0f} tokens per rank (cv {cv_key}) DEP wins: " + _why_below(rows, cv_key, mt)
             if mt > first else
             f"it beats DEP at every load of the sweep (cv {cv_key}, from {first:.0f} tokens per rank)")
    verdict = {"hot": "answer: replicate the hot experts", "dwdp": "answer: full DWDP (every expert prefetched)",
               "dep": "answer: DEP"}[answer]
    reason = (f"{verdict} ({tps[answer]:.0f} tok/s/GPU at the asked load; DEP {tps['dep']:.0f}, full DWDP "
              f"{tps['dwdp']:.0f}, hot replication {tps['hot']:.0f}); {head}; {floor}")
    return {"hot_experts": best["hot_experts"], "candidates": cands, "point": hp, "memory": mem, "answer": answer,
            "tokens_per_s_per_gpu": tps, "sweep": rows, "min_tokens": min_tokens, "best_range": best_range,
            "reason": reason,
            "histogram": {"source": hist.source, "layers": list(hist.layers), "num_experts": hist.num_experts,
                          "top_k": hist.top_k}}


def _why_below(rows: list[dict], cv_key: str, mt: float) -> str:
    below = [r for r in rows if str(r["cv"]) == cv_key and r["mean_tokens"] < mt]
    if below and below[-1]["hot_exposed_s"] > 0:
        return "the hot experts' prefetch no longer hides under the layer"
    return "the all-to-all and skew it saves do not pay for the prefetch's interference with compute"

"""DWDP against DEP for one load, the schedule/chunk/depth choice, and the whole ``advise`` answer."""

from __future__ import annotations

from dataclasses import asdict
from typing import Sequence

from ...errors import InvalidArgumentError, bad_arg
from .. import model as M
from ..fabric import FabricChoice, choose_fabric
from ..patterns import make_plans, parse_schedule
from ..units import chunk_text
from .compute import H200_EFFECTIVE_TFLOPS, measure_compute, modelled_compute, time_cuda
from .hot import dep_owner_shares, hot_replication
from .layer import breakeven_tokens, memory_per_rank, predict_point
from .routing import load_routing
from .shape import MoEShape, get_shape, load_from

__all__ = ["SCHEMA", "measure_pair_GBps", "fabric_for", "choose_fabric_for", "prefetch_seconds", "advise"]

SCHEMA = "dwdp-bench/advise/v1"


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
        s = time_cuda(lambda: dst.copy_(src, non_blocking=True), iters=5)
    return nbytes / s / 1e9


def fabric_for(group_size: int, fabric: str = "auto", link_GBps: float | None = None, *,
               device_name: str | None = None, detect: bool = True) -> M.Fabric:
    """The fabric ``advise`` models (:func:`choose_fabric_for`'s, without the reason)."""
    return choose_fabric_for(group_size, fabric, link_GBps, device_name=device_name, detect=detect)[0]


def choose_fabric_for(group_size: int, fabric: str = "auto", link_GBps: float | None = None, *,
                      device_name: str | None = None, detect: bool = True) -> tuple[M.Fabric, FabricChoice]:
    """The fabric for ``group_size`` GPUs and why (:func:`dwdp_comm.bench.fabric.choose_fabric`:
    ``"auto"`` = this GPU kind's preset, a preset name, or a fabric file), with its pair rate
    replaced by ``link_GBps`` when given (duplex scaled as calibrated: 386 / 394).

    Returns
    -------
    (Fabric, FabricChoice)
        The fabric to model (with the override) and the choice it came from.
    """
    choice = choose_fabric(fabric, group_size, device_name=device_name, detect=detect)
    return _with_link(choice.fabric, link_GBps), choice


def _with_link(fab: M.Fabric, link_GBps: float | None) -> M.Fabric:
    if link_GBps is None:
        return fab
    if not link_GBps > 0:
        raise bad_arg("link_GBps", link_GBps, "a rate in GB/s > 0")
    e = link_GBps * 1e9
    return fab.with_(egress_Bps=e, ingress_Bps=e, duplex_Bps=2 * e * 386.0 / 394.0,
                     name=f"{fab.name}@{link_GBps:g}GB/s")


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


def advise(model: str | MoEShape | dict = "deepseek-v3", group_size: int = 4, *, weights: str = "bf16",
           mean_tokens: float | None = 8192, cv: float = 0.2, cvs: Sequence[float] | None = None,
           tokens: Sequence[int] | None = None, seq_len: int | None = 8192,
           link_GBps: float | None = None, fabric: str = "auto", measure: str = "auto",
           tflops: float = H200_EFFECTIVE_TFLOPS, interference: float | None = None,
           schedules: Sequence[str] = ("round_robin", "parallel", "batch"), chunks: Sequence[int] = (8 << 20, 0),
           depths: Sequence[int] = (2, 3), sweep: Sequence[int] | None = None,
           a2a_efficiency: float = 0.75, kernel_backend: str = "auto", device_name: str | None = None,
           routing=None, hot_experts: Sequence[int] | None = None) -> dict:
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
        Pair copy rate; default: measured by a pair copy when two GPUs are visible (``measure``)
        and the fabric is not a file, else the fabric's.
    fabric : str
        ``"auto"`` (the preset of the GPU this process sees; said when borrowed), a preset of
        :data:`dwdp_comm.bench.fabric.PRESETS` (``h200``, ``h100``, ``b200``, ``nvl72``), or a fabric
        file written by ``dwdp-bench calibrate --write FILE`` (:func:`dwdp_comm.bench.fabric.choose_fabric`).
    measure : {"auto", "yes", "no", "cpu"}
        Measure compute on the local GPU ("auto": when CUDA is available; "cpu": the same
        measurement on the CPU, for tests of tiny shapes).
    tflops, interference : modelled compute rate, and the DWDP compute slowdown under a prefetch
        (given overrides measured; default when not measured: H200_INTERFERENCE, the committed 2 x H200 figure).
    schedules, chunks, depths : candidates to choose from.
    sweep : token counts per rank of the speedup curve (default 512 .. 64K, powers of 2).
    device_name : str, optional
        The GPU to choose the fabric for (default: the one torch sees, if any).
    routing : str, dict or RoutingHistogram, optional
        A routing histogram (:func:`~dwdp_comm.bench.advise.routing.load_routing`: a JSON or CSV
        file, or the telemetry's record). With it DEP's busiest owner carries its skew (DEP's
        contiguous split), and the result gains ``hot``: the third answer, replicating only the
        hottest experts (:func:`~dwdp_comm.bench.advise.hot.hot_replication`).
    hot_experts : sequence of int, optional
        Hot-set sizes to try (default 1, 2, 4, ... up to half the experts).

    Returns
    -------
    dict
        ``schema``, ``inputs``, ``sources`` (what was measured, given or modelled), ``choice``
        (schedule, chunk, depth, reason), ``point`` (the asked load, :func:`predict_point`),
        ``memory``, ``sweep`` (rows per CV and token count), ``breakeven_tokens`` (per CV);
        ``inputs["fabric_choice"]``: the fabric's basis, whether it is borrowed, and why; with
        ``routing``: ``hot`` and ``routing`` (the histogram's summary).
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
    choice = choose_fabric(fabric, G, device_name=device_name, detect=device_name is None)
    hist = shares = None
    if routing is not None:
        hist = load_routing(routing).padded(shape.num_experts)
        if hist.top_k is not None and hist.top_k != shape.top_k:
            raise bad_arg("routing top_k", hist.top_k, f"{shape.top_k} (the model's top_k)",
                          "a histogram recorded on another model?")
        if G < 2:
            raise bad_arg("group_size", G, ">= 2 with a routing histogram (one rank has no expert parallelism)")
        shares = dep_owner_shares(hist, G)
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
    # a fabric file carries its own measured pair rate (and more): no pair copy on top of it
    measured_link = measure_pair_GBps() if (link_GBps is None and use_gpu and choice.basis != "file") else None
    fab = _with_link(choice.fabric, link_GBps if link_GBps is not None else measured_link)
    if costs.source == "modelled" and choice.device_name and "H200" not in choice.device_name:
        sources["compute"] += f" (one H200's rate: this GPU is {choice.device_name!r}; --measure yes times it)"
    sources["fabric"] = choice.text
    sources["link"] = (f"given: {link_GBps:g} GB/s" if link_GBps is not None else
                       f"measured pair copy: {measured_link:.1f} GB/s" if measured_link else
                       f"fabric {fab.name}: {fab.pair_Bps / 1e9:.0f} GB/s pair")
    sources["prefetch"] = f"modelled: contention model (dwdp_comm.bench.model, per_stream executor) on {fab.name}"
    sources["all_to_all"] = f"modelled: bytes / ({a2a_efficiency:g} x pair rate) + 30 us, twice a layer"
    mem_any = memory_per_rank(shape, G, weights, 1)
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
    pt = predict_point(shape, load, costs, best["prefetch_s"], fab.pair_Bps, a2a_efficiency, owner_shares=shares)
    compute_min = min(d - e for d, e in zip(pt["dwdp_layer_s"], pt["dwdp_exposed_s"]))
    ratio = best["prefetch_s"] / compute_min
    hidden = ratio <= 1.0
    # a thin margin (ranks' compute varies by iteration) wants one more slot; a clear margin or a
    # bandwidth deficit does not (more slots cannot raise the copy rate)
    thin = 0.8 < ratio <= 1.0 and len(depths) > 1
    depth = sorted(depths)[1] if thin else min(depths)
    reason = (f"{best['schedule']} with {chunk_text(best['chunk_nbytes'])} chunks pulls a layer's "
              f"{(G - 1) * per_source / 1e9:.2f} GB in {1e3 * best['prefetch_s']:.2f} ms"
              + (" (the fastest, or tied with the fewest copies; others: "
                 + ", ".join(f"{r['schedule']}/{chunk_text(r['chunk_nbytes'])} {1e3 * r['prefetch_s']:.2f}"
                             for r in others) + " ms)" if others else " (the only candidate)") + "; "
              + (f"it hides under the shortest rank's compute ({1e3 * compute_min:.2f} ms) with a thin margin "
                 f"({100 * ratio:.0f} %), so depth {depth}: one more slot absorbs iteration-to-iteration jitter"
                 if thin else
                 f"it hides under the shortest rank's compute ({1e3 * compute_min:.2f} ms, {100 * ratio:.0f} %), so "
                 f"depth {depth} (the fewest slots) suffices" if hidden else
                 f"it exceeds the shortest rank's compute ({1e3 * compute_min:.2f} ms): exposed; depth {depth}, "
                 "since more slots cannot hide a bandwidth deficit (only more tokens per rank can)"))
    rows, triples = [], []
    for c in cvs:
        for s in sweep:
            p = predict_point(shape, sweep_loads[(c, s)], costs, best["prefetch_s"], fab.pair_Bps, a2a_efficiency,
                              owner_shares=shares)
            rows.append({"cv": c, **p})
            triples.append((c, sweep_loads[(c, s)], p))
    be = {str(c): breakeven_tokens([r for r in rows if r["cv"] == c]) for c in cvs}
    extra = {}
    if hist is not None:
        def pull(per_source: int) -> float:
            return prefetch_seconds(fab, per_source, best["schedule"], best["chunk_nbytes"])
        extra["hot"] = hot_replication(shape, load, costs, hist, prefetch=pull, link_Bps=fab.pair_Bps, weights=weights,
                                       depth=depth, cv=float(cv), point=pt, sweep=triples,
                                       a2a_efficiency=a2a_efficiency, candidates=hot_experts)
        extra["routing"] = {"source": hist.source, "layers": list(hist.layers), "num_experts": hist.num_experts,
                            "top_k": hist.top_k, "dep_owner_skew": pt["dep_owner_skew"]}
        sources["routing"] = (f"histogram {hist.source}: {len(hist.layers)} layer(s), {hist.num_experts} experts; "
                              f"DEP's busiest owner computes {pt['dep_owner_skew']:.2f}x the mean routed rows "
                              "(contiguous split)")
    return {"schema": SCHEMA, "model": asdict(shape), "group_size": G, "weights": weights,
            "inputs": {"tokens": list(load.tokens), "cv": cv, "mean_tokens": load.mean, "seq_len": seq_len,
                       "fabric": fab.as_dict(),
                       "fabric_choice": {k: v for k, v in choice.as_dict().items() if k != "fabric"},
                       "a2a_efficiency": a2a_efficiency, "measure": measure},
            "sources": sources, "compute_points": {str(k): v for k, v in costs.points.items()},
            "interference": costs.interference, "candidates": cands,
            "choice": {"schedule": best["schedule"], "chunk_nbytes": best["chunk_nbytes"], "depth": depth,
                       "reason": reason},
            "point": pt, "memory": memory_per_rank(shape, G, weights, depth), "sweep": rows, "breakeven_tokens": be,
            **extra}


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


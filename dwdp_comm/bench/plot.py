"""The benchmark's figure: bandwidth per schedule, and a per-rank timeline of which source each rank
read when (matplotlib, imported only here).

Timelines come from the model: on the model backend they are the simulated copies of the rows; for
measured backends (no per-copy timestamps are taken there, to keep the timing undisturbed) the
figure shows the model's timeline of the same cases, its panels titled with the modelled fabric and
size and that it is not the run plotted.
"""

from __future__ import annotations

__all__ = ["plot", "select_timeline_rows"]


def select_timeline_rows(rows: list[dict]) -> list[dict]:
    """The rows whose timelines the figure shows: the full exchange (else the first pattern), the
    largest size, the first chunk size, one per schedule."""
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return []
    pats = [r["pattern"] for r in ok]
    pat = "full" if "full" in pats else pats[0]
    sel = [r for r in ok if r["pattern"] == pat]
    n = max(r["nbytes"] for r in sel)
    chunk = sel[0]["chunk_nbytes"]
    out, seen = [], set()
    for r in sel:
        if r["nbytes"] == n and r["chunk_nbytes"] == chunk and r["schedule"] not in seen:
            seen.add(r["schedule"])
            out.append(r)
    return out


def _model_timelines(doc: dict, rows: list[dict]) -> tuple[str, dict]:
    """Simulate ``rows`` (measured elsewhere) with the model: (fabric name, schedule -> timeline)."""
    from . import model as M
    from .contention import timeline_of
    from .patterns import make_plans, parse_schedule
    G = doc["group_size"]
    fabric = M.h200(G) if G <= 8 else M.nvl72(G)
    out = {}
    for r in rows:
        try:
            sch = parse_schedule(r["schedule"])
            plans = make_plans(r["pattern"], sch, G, r["nbytes"], r["chunk_nbytes"])
            out[r["schedule"]] = timeline_of(M.simulate(plans, fabric, options=r["options"]))
        except Exception:  # an option the model lacks: no timeline for that schedule
            continue
    return fabric.name, out


def plot(doc: dict, path: str) -> tuple[bool, str]:
    """Draw the figure of a result document into ``path``.

    Returns
    -------
    (written, message) : (bool, str)
        Whether ``path`` was written, and a one-line message saying so or why not.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False, (f"plot skipped: matplotlib is not installed (pip install matplotlib, or the [plot] extra); "
                       f"{path} not written")
    rows = [r for r in doc["rows"] if r["status"] == "ok"]
    if not rows:
        return False, f"plot skipped: no measured rows; {path} not written"
    tl_rows = select_timeline_rows(doc["rows"])
    pat = tl_rows[0]["pattern"]
    measured = doc["backend"] != "model"
    timelines = {r["schedule"]: r["timeline"] for r in tl_rows if r.get("timeline")}
    size = _fmt(tl_rows[0]["nbytes"]) + " per source"
    if timelines:
        tl_label = f"model of {(doc.get('model') or {}).get('fabric', {}).get('name', 'the fabric')}, {size}"
    else:
        fabric_name, timelines = _model_timelines(doc, tl_rows)
        tl_label = (f"MODEL of {fabric_name}, {size}: not the {doc['backend']} run" if measured
                    else f"model of {fabric_name}, {size}")
    n_tl = len(timelines)
    G = doc["group_size"]
    fig = plt.figure(figsize=(13, max(4.0, 1.2 + 1.6 * max(n_tl, 1))), constrained_layout=True)
    gs = fig.add_gridspec(max(n_tl, 1), 2, width_ratios=[1, 1.4])

    ax = fig.add_subplot(gs[:, 0])
    sel = [r for r in rows if r["pattern"] == pat]
    # sim rows have no ideal (see contention.without_ideal): plot their bandwidth instead
    metric = "pct_ideal" if all(r["pct_ideal"] is not None for r in sel) else "agg_GBps"
    sizes = sorted({r["nbytes"] for r in sel})
    keys = list(dict.fromkeys((r["schedule"], r["chunk_nbytes"]) for r in sel))
    for sched, chunk in keys:
        pts = sorted((r["nbytes"], r[metric]) for r in sel if r["schedule"] == sched and r["chunk_nbytes"] == chunk)
        label = f"{sched}, chunk {'whole' if chunk == 0 else _fmt(chunk)}"
        if len(sizes) > 1:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        else:
            ax.bar(label, pts[0][1])
    if len(sizes) > 1:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [_fmt(s) for s in sizes])
        ax.set_xlabel("bytes per source")
        ax.legend(fontsize=7)
    else:
        ax.tick_params(axis="x", rotation=60, labelsize=7)
        ax.set_xlabel(f"{_fmt(sizes[0])} per source")
    if metric == "pct_ideal":
        ax.axhline(90, color="grey", lw=0.8, ls="--")
        ax.set_ylabel("% of ideal (port bound at the pair rate)")
    else:
        ax.set_ylabel("aggregate GB/s (no ideal on sim)")
    src = doc["backend"] + ("" if measured else f" ({doc.get('model', {}).get('arbitration', '')})")
    ax.set_title(f"{pat}, G={G}, {src}")

    cmap = plt.get_cmap("tab10" if G <= 10 else "viridis")
    first = None
    for k, (sched, tl) in enumerate(timelines.items()):
        a = fig.add_subplot(gs[k, 1], sharex=first)
        first = first or a
        lanes = max((c[1] for c in tl), default=0) + 1
        bars: dict[tuple, list] = {}
        for rank, lane, s, t0, t1 in tl:  # one broken_barh per (rank, lane, source)
            bars.setdefault((rank, lane, s), []).append((t0 / 1e3, max(t1 - t0, 1e-3) / 1e3))
        for (rank, lane, s), spans in bars.items():
            a.broken_barh(spans, (rank + lane / lanes, 0.9 / lanes),
                          color=cmap(s % 10 if G <= 10 else s / max(G - 1, 1)))
        a.set_ylim(0, G)
        a.set_ylabel("rank")
        a.set_title(f"{sched}: source read by each rank ({tl_label})", fontsize=8)
        if k == n_tl - 1:
            a.set_xlabel("ms")
    if n_tl and G <= 10:
        import matplotlib.patches as mp
        fig.legend(handles=[mp.Patch(color=cmap(s), label=f"source {s}") for s in range(G)],
                   loc="outside lower right", fontsize=7, ncol=G)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True, f"wrote {path}" + ("" if n_tl else " (no timeline: the model cannot run these schedules)")


def _fmt(n: int) -> str:
    from .report import format_size
    return format_size(n)

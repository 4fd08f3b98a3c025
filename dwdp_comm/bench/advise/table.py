"""``advise``'s answer as nccl-tests style text, and its speedup curve as a figure."""

from __future__ import annotations

from ..units import chunk_text

__all__ = ["format_table", "plot_speedup"]

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
    out += [f"# choice: schedule {ch['schedule']}, chunk {chunk_text(ch['chunk_nbytes'])}, depth {ch['depth']}: "
            f"{ch['reason']}",
            f"# memory per rank (routed experts, {sh['num_layers']} layers): DEP {mem['dep_nbytes'] / 2**30:.1f} GiB; "
            f"DWDP {mem['dwdp_nbytes'] / 2**30:.1f} GiB ({mem['local_experts']} local experts a layer + "
            f"{ch['depth']} slots of {mem['dwdp_slot_nbytes'] / max(ch['depth'], 1) / 2**30:.2f} GiB)",
            "# times are per layer; compute, exposed and dwdp: the largest over ranks; wait: DEP's largest"]
    if "hot" in res:
        out += _hot_lines(res)
    pt = res["point"]
    be = ", ".join(f"cv {c}: {'none in range' if v is None else f'{v:.0f}'}" for c, v in res["breakeven_tokens"].items())
    out.append(f"# asked load: DWDP {pt['dwdp_tokens_per_s_per_gpu']:.0f} tok/s/GPU, DEP "
               f"{pt['dep_tokens_per_s_per_gpu']:.0f}, speedup {pt['speedup']:.3f}; break-even tokens per rank: {be}")
    hot = res.get("hot")
    cols = _COLS + ([_HOT_COL] if hot else [])
    out.append("#" + "".join(f"{n:>{w}} " for n, _, w in cols)[1:].rstrip())
    out.append("#" + "".join(f"{u:>{w}} " for _, u, w in cols)[1:].rstrip())
    for i, r in enumerate(res["sweep"]):
        comp = max(d - e for d, e in zip(r["dwdp_layer_s"], r["dwdp_exposed_s"]))
        vals = [f"{r['cv']:g}", str(round(r["mean_tokens"])), f"{1e3 * comp:.3f}", f"{1e3 * r['prefetch_s']:.3f}",
                f"{1e3 * max(r['dwdp_exposed_s']):.3f}", f"{1e3 * max(r['dwdp_layer_s']):.3f}",
                f"{1e3 * r['dep_all_to_all_s']:.3f}", f"{1e3 * max(r['dep_wait_s']):.3f}",
                f"{1e3 * r['dep_layer_s']:.3f}", f"{r['dwdp_tokens_per_s_per_gpu']:.0f}",
                f"{r['dep_tokens_per_s_per_gpu']:.0f}", f"{r['speedup']:.3f}"]
        if hot:
            vals.append(f"{hot['sweep'][i]['hot_tokens_per_s_per_gpu']:.0f}")
        out.append("".join(f"{v:>{w}} " for v, (_, _, w) in zip(vals, cols)).rstrip())
    return "\n".join(out)


_HOT_COL = ("hot", "(tok/s/GPU)", 12)


def _hot_lines(res: dict) -> list[str]:
    """The hot-expert answer's preamble: the verdict, its memory, where it is the fastest."""
    h, m, sh, ch = res["hot"], res["hot"]["memory"], res["model"], res["choice"]
    gib = 2 ** 30
    rng = "; ".join(f"cv {c}: " + (", ".join(str(round(t)) for t in ts) if ts else "nowhere")
                    for c, ts in h["best_range"].items())
    return [f"# hot-expert replication: {h['reason']}",
            f"# hot-expert memory per rank (routed experts, {sh['num_layers']} layers): {m['total_nbytes'] / gib:.1f} GiB "
            f"= DEP's shard {m['sharded_nbytes'] / gib:.1f} GiB ({m['local_experts']} experts a layer, up to "
            f"{m['hot_owned_max']} of them hot) + {ch['depth']} slots of the {m['slot_experts']} hot experts a rank "
            f"lacks ({m['slot_nbytes'] / gib:.2f} GiB); full DWDP {res['memory']['dwdp_nbytes'] / gib:.1f} GiB",
            f"# hot-expert replication is the fastest of the three at tokens per rank: {rng} (column hot)"]


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

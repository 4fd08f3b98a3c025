"""Render a Chrome-trace JSON written by dwdp_comm (``dwdp_comm.trace``) to a PNG timeline.

One row per track (rank, then compute stream, prefetch slots, copies per source), one bar per
slice, coloured by category (compute, exposed wait, prefetch job, copy). For a committed picture of
a trace; open the JSON itself at https://ui.perfetto.dev for the interactive view.

    python3 perf/trace_png.py perf/results/trace_h100.json perf/results/trace_h100.png
    python3 perf/trace_png.py TRACE.json OUT.png --window 120 180     # milliseconds 120 to 180 only

Needs matplotlib (the ``plot`` extra).
"""

from __future__ import annotations

import argparse
import json
import sys

COLORS = {"compute": "#4c72b0", "exposed_wait": "#c44e52", "prefetch": "#8172b2", "copy": "#55a868"}


def tracks_of(doc: dict) -> tuple[list[tuple[int, int]], dict, dict]:
    """(ordered (pid, tid) rows, row names, slices per row) of a trace document."""
    pnames, tnames, slices = {}, {}, {}
    for e in doc["traceEvents"]:
        if e["ph"] == "M" and e["name"] == "process_name":
            pnames[e["pid"]] = e["args"]["name"]
        elif e["ph"] == "M" and e["name"] == "thread_name":
            tnames[(e["pid"], e["tid"])] = e["args"]["name"]
        elif e["ph"] == "X":
            slices.setdefault((e["pid"], e["tid"]), []).append(e)
    rows = sorted(slices)
    names = {k: f"r{k[0]} {tnames.get(k, k[1])}" for k in rows}
    return rows, names, slices


def render(doc: dict, out: str, window: tuple[float, float] | None = None, title: str | None = None) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows, names, slices = tracks_of(doc)
    if not rows:
        raise SystemExit("trace_png: the trace has no slices")
    fig, ax = plt.subplots(figsize=(14, 0.35 * len(rows) + 1.5))
    lo, hi = window if window else (None, None)
    for y, key in enumerate(reversed(rows)):
        for e in slices[key]:
            t0, dur = e["ts"] / 1e3, e["dur"] / 1e3  # ms
            if window and (t0 + dur < lo or t0 > hi):
                continue
            nested = e["cat"] == "exposed_wait"
            ax.broken_barh([(t0, max(dur, 1e-4))], (y - 0.4 + (0.2 if nested else 0), 0.8 - (0.4 if nested else 0)),
                           facecolors=COLORS.get(e["cat"], "#999999"), edgecolor="none")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([names[k] for k in reversed(rows)], fontsize=7)
    ax.set_xlabel("time (ms)")
    if window:
        ax.set_xlim(lo, hi)
    ax.legend(handles=[Patch(color=c, label=k.replace("_", " ")) for k, c in COLORS.items()], loc="lower center",
              bbox_to_anchor=(0.5, 1.0), fontsize=7, ncol=4, frameon=False)
    ax.set_title(title or doc.get("otherData", {}).get("title", "dwdp_comm trace"), fontsize=9, pad=18)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trace", help="a Chrome-trace JSON file (dwdp_comm.trace.write_trace)")
    p.add_argument("out", help="the PNG to write")
    p.add_argument("--window", nargs=2, type=float, metavar=("START_MS", "END_MS"), help="only this time range")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("trace_png: needs matplotlib (pip install matplotlib, or the 'plot' extra)", file=sys.stderr)
        return 2
    with open(args.trace) as fh:
        doc = json.load(fh)
    render(doc, args.out, tuple(args.window) if args.window else None, args.title)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

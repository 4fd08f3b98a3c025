"""The model against its calibration table, and its predictions for larger groups.

``python -m dwdp_comm.bench.calibrate`` (or ``dwdp-bench calibrate``) prints every row of
``calibration_h200x4.json`` (the 4 x H200 measurements of ``DEVICE_NOTES.md``) next to the model
and the error; ``dwdp-bench predict`` prints the predictions for 8 x H200 and an NVL72-like domain.
``dwdp-bench calibrate --write FILE`` measures this machine's GPUs instead (:func:`write_fabric`) and
writes a fabric file that ``dwdp-bench advise --fabric FILE`` models.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from typing import Iterable

import numpy as np

from . import fabric_measure
from . import model as M
from . import record
from .fabric import save_fabric
from .patterns import make_plans, parse_schedule, port_bound_time

__all__ = ["load_calibration", "compare", "format_compare", "predict", "format_predictions", "write_fabric",
           "PREDICTION_SCHEDULES", "CLAIMED_TOLERANCE", "MAX_EVENT_COPIES"]

# Every row of the table is claimed within this relative error (tests assert it).
CLAIMED_TOLERANCE = 0.15


def load_calibration() -> dict:
    """The measured table (``calibration_h200x4.json``) with its source."""
    text = resources.files(__package__).joinpath("calibration_h200x4.json").read_text()
    return json.loads(text)


def _case_GBps(fabric: M.Fabric, pattern: str, schedule: str, nbytes: int, chunk: int, options: dict,
               executor: str, arbitration: str = "fair", issue_order: str = "stream",
               starts=None) -> tuple[float, M.SimResult]:
    sch = parse_schedule(schedule)
    G = fabric.group_size
    plans = make_plans(pattern, sch, G, nbytes, chunk)
    res = M.simulate(plans, fabric, options=sch.engine_options(G, options), executor=executor,
                     arbitration=arbitration, issue_order=issue_order, starts=starts)
    total = sum(p.total_nbytes for p in plans)
    return total / res.makespan / 1e9, res


def compare(fabric: M.Fabric | None = None) -> list[dict]:
    """Model against every calibration row.

    Returns
    -------
    list of dict
        ``id, description, measured_GBps, model_GBps, error`` (relative, model / measured - 1).
    """
    cal = load_calibration()
    fabric = fabric or M.h200(cal["group_size"])
    out = []
    for row in cal["rows"]:
        got, _ = _case_GBps(fabric, row["pattern"], row["schedule"], row["nbytes_per_source"], row["chunk_nbytes"],
                            row["engine_options"], row["model_executor"])
        out.append({"id": row["id"], "description": row["description"], "measured_GBps": row["measured_GBps"],
                    "model_GBps": got, "error": got / row["measured_GBps"] - 1.0,
                    "executor": row["model_executor"]})
    return out


def format_compare(rows: Iterable[dict]) -> str:
    """A Markdown table of :func:`compare`'s rows."""
    lines = ["| row | measured GB/s | model GB/s | error |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['description']} | {r['measured_GBps']:.0f} | {r['model_GBps']:.0f} | "
                     f"{100 * r['error']:+.1f} % |")
    return "\n".join(lines)


# The schedules the predictions cover: (label, schedule spec, chunk bytes or 0 for whole).
PREDICTION_SCHEDULES = [
    ("naive", "naive", 0),
    ("rotated", "rotated", 0),
    ("round_robin 8M", "round_robin", 8 << 20),
    ("round_robin 64M", "round_robin", 64 << 20),
    ("batch 2M", "batch", 2 << 20),
    ("batch 8M", "batch", 8 << 20),
    ("parallel", "parallel", 0),
    ("parallel+batch 8M", "parallel+api=batch", 8 << 20),
    ("tdm 64M", "tdm", 64 << 20),
    ("tdm whole", "tdm", 0),
    ("tdm_source whole", "tdm_source", 0),
]


#: ``predict`` leaves out a row whose only computation is the event simulation of more copies than
#: this (about a minute of CPU per 100K copies at G = 72); ``max_event_copies=None`` runs everything.
MAX_EVENT_COPIES = 100_000


def predict(fabric: M.Fabric, nbytes: int, *, skew: float = 0.0, trials: int = 3, seed: int = 0,
            arbitrations=("fair", "fifo"), schedules=None, method: str = "auto",
            max_event_copies: int | None = MAX_EVENT_COPIES) -> list[dict]:
    """The full exchange under each schedule, as % of the port bound (``G x pair``).

    Parameters
    ----------
    fabric : Fabric
    nbytes : int
        Bytes each rank pulls from each peer.
    skew : float
        Ranks start at uniform random times in ``[0, skew x ideal layer time]``; the time of a trial
        is the largest own duration (end - own start) over ranks, averaged over ``trials``.
    arbitrations : sequence of str
        ``per_stream`` arbitrations to report.
    method : {"auto", "event"}
        :func:`~dwdp_comm.bench.model.simulate`'s ``method``.
    max_event_copies : int or None
        A row that only the event simulation computes (:func:`~dwdp_comm.bench.model.method_for`)
        over more copies than this is left out: ``pct_ideal`` and ``agg_GBps`` None, ``skipped``
        says why. None: every row.

    Returns
    -------
    list of dict
        ``schedule, arbitration, pct_ideal, agg_GBps, method, skipped``.
    """
    G = fabric.group_size
    t_ideal = port_bound_time("full", G, nbytes, fabric.pair_Bps)
    rng = np.random.default_rng(seed)
    draws = [np.zeros(G)] if skew == 0 else [rng.uniform(0, skew * t_ideal, G) for _ in range(trials)]
    plans_of: dict[tuple, list] = {}  # schedules that share a policy and chunk share plans
    out = []
    for label, spec, chunk in (schedules or PREDICTION_SCHEDULES):
        sch = parse_schedule(spec)
        key = (sch.policy, chunk)
        if key not in plans_of:
            plans_of[key] = make_plans("full", sch, G, nbytes, chunk)
        plans = plans_of[key]
        opts = sch.engine_options(G)
        for arb in arbitrations:
            times, how, skipped = [], set(), None
            for st in draws:
                m = "event" if method == "event" else M.method_for(plans, fabric, M.parse_options(opts), st,
                                                                     "per_stream", arb)
                ncopies = sum(len(p) for p in plans)
                if m == "event" and max_event_copies is not None and ncopies > max_event_copies:
                    skipped = (f"only the event simulation computes it ({ncopies} copies > max_event_copies="
                               f"{max_event_copies})")
                    break
                res = M.simulate(plans, fabric, options=opts, starts=st, arbitration=arb, method=method)
                how.add(res.info["method"])
                times.append(float(res.durations.max()))
            row = {"schedule": label, "arbitration": arb, "pct_ideal": None, "agg_GBps": None,
                   "method": "/".join(sorted(how)) or None, "skipped": skipped}
            if skipped is None:
                t = float(np.mean(times))
                row.update(pct_ideal=100 * t_ideal / t, agg_GBps=G * (G - 1) * nbytes / t / 1e9)
            out.append(row)
    return out


def format_predictions(rows: list[dict], title: str) -> str:
    """A Markdown table: one row per schedule, one column per arbitration (``n/a``: left out)."""
    arbs = list(dict.fromkeys(r["arbitration"] for r in rows))
    scheds = list(dict.fromkeys(r["schedule"] for r in rows))
    lines = [f"**{title}**", "", "| schedule | " + " | ".join(f"{a}: % of ideal (agg GB/s)" for a in arbs) + " |",
             "|---|" + "---:|" * len(arbs)]
    for s in scheds:
        cells = []
        for a in arbs:
            r = next(x for x in rows if x["schedule"] == s and x["arbitration"] == a)
            cells.append("n/a" if r["pct_ideal"] is None else f"{r['pct_ideal']:.0f} % ({r['agg_GBps']:.0f})")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _portable_source(source: str) -> str:
    """The calibration's source without the directory of the machine it was written on."""
    return re.sub(r"(?<![\w.])/(?:[\w.+-]+/)+", "", source)


def write_fabric(path: str, base: str = "auto", nbytes: int = 1 << 30, iters: int = 5,
                 command: list | None = None) -> dict:
    """Measure this machine's GPUs (:func:`dwdp_comm.bench.fabric_measure.measure_local`, blocking, a few
    seconds), fit a fabric (:func:`~dwdp_comm.bench.fabric_measure.fit_fabric`; unmeasured fields from
    ``base``) and write it to ``path`` with the run record; print what each field is and where it came from.

    Returns
    -------
    dict
        The document written (:func:`dwdp_comm.bench.fabric.save_fabric`).
    """
    measured = fabric_measure.measure_local(nbytes, iters)
    fab, prov = fabric_measure.fit_fabric(measured, base)
    base_name = fab.name.removesuffix("-measured")
    doc = save_fabric(path, fab, gpu=measured["gpu"], gpus_measured=measured["gpus"], base=base_name,
                      provenance=prov, measurements=measured,
                      record={"date": record.utc_date(), "commit": record.commit(short=True),
                              "machine": record.machine_lines(), "command": command or []})
    print(f"# dwdp-bench calibrate --write: the fabric of {measured['gpu']} x {measured['gpus']} "
          f"(the fields not measured from {base_name})")
    for k, v in doc["values"].items():
        shown = f"{v / 1e9:.1f} GB/s" if k.endswith("_Bps") and v else f"{1e6 * v:.2f} us" if k.endswith("_s") and v \
            else str(v)
        print(f"# {k:24s} {shown:>14s}  {doc['provenance'][k]}")
    print(f"# wrote {path}: dwdp-bench advise --fabric {path} models it")
    return doc


def main(argv=None) -> int:
    """Print model vs measured for every calibration row."""
    rows = compare()
    cal = load_calibration()
    print(f"# calibration: {_portable_source(cal['source'])} (4 x H200; packaged as dwdp_comm/bench/calibration_h200x4.json)")
    print(f"# harness: {cal['harness']}")
    print(format_compare(rows))
    worst = max(abs(r["error"]) for r in rows)
    print(f"# worst error {100 * worst:.1f} % (claimed: every row within {100 * CLAIMED_TOLERANCE:.0f} %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

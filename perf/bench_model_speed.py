"""CPU benchmark of the contention model: ``predict`` and ``contention --backend model`` at
G = 4, 8, 16, 32, 72, the event simulation of every copy (the old path, the reference) against
``method="auto"`` (the rotation quotient, coalesced runs, the event simulation where nothing else
applies), side by side in one run.

Each measurement runs in a child process (fork) with a time limit (``--limit``, default 60 s): a
path that does not finish is reported as such, not waited for. Times are wall and CPU seconds of
the child (the CPU time is the better figure on a shared machine; the load average is recorded).
Where both paths finish, every predict cell and every contention row is compared (largest relative
difference of the time). Last, the two commands the issue names are timed end to end as a user
runs them (``python -m dwdp_comm.bench ...``, imports included).

Usage: python -m perf.bench_model_speed [--out FILE] [--limit S] [--groups 4,8,16,32,72]
(or ``python perf/bench_model_speed.py`` from the repository root with it on ``PYTHONPATH``).
Committed result: perf/results/model_speed_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

from dwdp_comm.bench import record


def _fabric(G: int):
    from dwdp_comm.bench import model as M
    return M.h200(G) if G <= 8 else M.nvl72(G)


def _predict(G: int, method: str) -> dict:
    from dwdp_comm.bench.calibrate import MAX_EVENT_COPIES, predict
    rows = predict(_fabric(G), 1 << 30, method=method,
                   max_event_copies=None if method == "event" else MAX_EVENT_COPIES)
    return {f"{r['schedule']}/{r['arbitration']}": r["pct_ideal"] for r in rows}


def _contention(G: int, method: str) -> dict:
    """The CLI's model defaults: 8 MiB .. 1 GiB per source (x2), 8 MiB chunks, six schedules, fair."""
    from dwdp_comm.bench.cli import _DEFAULTS, _sizes, parse_size
    from dwdp_comm.bench.contention import BenchConfig, run_model
    lo, hi, fac, chunk, scheds, iters, warm = _DEFAULTS["model"]
    cfg = BenchConfig(group_size=G, sizes=_sizes(parse_size(lo), parse_size(hi), fac), chunks=[parse_size(chunk)],
                      schedules=scheds.split(","), patterns=["full"], iters=iters, warmup=warm, backend="model",
                      model_method=method)
    res = run_model(cfg)
    return {f"{r['schedule']}/{r['nbytes']}": r["time_us"] for r in res["rows"]}


def _child(conn, fn, G, method):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(G, method)
    conn.send({"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "values": out})


def timed(fn, G: int, method: str, limit: float) -> dict:
    """``fn(G, method)`` in a forked child, at most ``limit`` seconds: wall/CPU seconds and values,
    or ``{"finished": False}``."""
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(send, fn, G, method))
    p.start()
    got = recv.recv() if recv.poll(limit) else None
    if got is None:
        p.terminate()
    p.join()
    return {"finished": False, "limit_s": limit} if got is None else {"finished": True, **got}


def agreement(old: dict, new: dict) -> float | None:
    """Largest relative difference over the keys both computed (None where none)."""
    diffs = [abs(new[k] / old[k] - 1) for k in old if old.get(k) and new.get(k)]
    return max(diffs) if diffs else None


def cli_time(args: list[str], limit: float) -> dict:
    """One CLI command as a user runs it: wall seconds and the child's CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    try:
        run = subprocess.run([sys.executable, "-m", "dwdp_comm.bench", *args], capture_output=True, text=True,
                             timeout=limit)
        ok = run.returncode == 0
    except subprocess.TimeoutExpired:
        return {"command": "dwdp-bench " + " ".join(args), "finished": False, "limit_s": limit}
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"command": "dwdp-bench " + " ".join(args), "finished": ok, "wall_s": time.perf_counter() - t0,
            "cpu_s": cpu}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write the results (JSON, with the run record) to this file")
    ap.add_argument("--limit", type=float, default=60.0, help="seconds a measurement may take (default 60)")
    ap.add_argument("--groups", default="4,8,16,32,72", help="group sizes (default 4,8,16,32,72)")
    ap.add_argument("--no-cli", action="store_true", help="skip timing the two CLI commands at -g 72")
    args = ap.parse_args()
    groups = [int(g) for g in args.groups.split(",")]
    load0 = os.getloadavg()
    rows = []
    print(f"{'what':>10} {'G':>3} {'event wall/cpu s':>18} {'auto wall/cpu s':>17} {'speed-up (cpu)':>15} "
          f"{'max diff':>9}")
    for what, fn in (("predict", _predict), ("contention", _contention)):
        old_finished = True
        for G in groups:
            new = timed(fn, G, "auto", args.limit)
            old = timed(fn, G, "event", args.limit) if old_finished else {"finished": False, "skipped": True}
            old_finished = old["finished"]  # a larger group would take longer still
            diff = agreement(old["values"], new["values"]) if old["finished"] and new["finished"] else None
            row = {"what": what, "group_size": G, "event": {k: v for k, v in old.items() if k != "values"},
                   "auto": {k: v for k, v in new.items() if k != "values"}, "max_rel_diff": diff,
                   "not_computed_auto": sorted(k for k, v in new.get("values", {}).items() if v is None)}
            rows.append(row)
            fmt = lambda r: (f"{r['wall_s']:7.2f}/{r['cpu_s']:6.2f}" if r["finished"]  # noqa: E731
                             else ("not run" if r.get("skipped") else f">{r['limit_s']:.0f} s"))
            speed = (f"{old['cpu_s'] / new['cpu_s']:.1f}x" if old["finished"] and new["finished"] else "-")
            print(f"{what:>10} {G:>3} {fmt(old):>18} {fmt(new):>17} {speed:>15} "
                  f"{'-' if diff is None else f'{100 * diff:.3f} %':>9}", flush=True)
    clis = [] if args.no_cli else [cli_time(["predict", "-g", "72"], 120.0),
                                   cli_time(["contention", "--backend", "model", "-g", "72"], 120.0)]
    for c in clis:
        print(f"# {c['command']}: " + (f"{c['wall_s']:.1f} s wall, {c['cpu_s']:.1f} s CPU" if c["finished"]
                                       else "did not finish"))
    load1 = os.getloadavg()
    print(f"# load average (1 min) at start / end: {load0[0]:.1f} / {load1[0]:.1f} on {os.cpu_count()} CPUs")
    if args.out:
        doc = {"benchmark": "model_speed",
               "run": {"commit": record.commit(short=True), "dirty": record.is_dirty(), "date": record.utc_date(),
                       "host": record.host(), "python": platform.python_version(), "numpy": np.__version__,
                       "cpus": os.cpu_count(), "load_avg_start": list(load0), "load_avg_end": list(load1),
                       "limit_s": args.limit},
               "notes": ["event: simulate(method='event'), every copy (the reference, the old path with its "
                         "quadratic steps removed); auto: simulate(method='auto')",
                         "predict: 1 GiB per source, fair and fifo, skew 0; contention: the CLI's model defaults",
                         "before this change (commit 80d6553, this machine, lightly loaded): predict -g 8 5.0 s "
                         "wall, predict -g 16 ~30 s, -g 72 did not finish in 10 min; contention -g 16 ~50 s "
                         "(issue 24)"],
               "rows": rows, "cli": clis}
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"# wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

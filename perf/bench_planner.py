"""CPU benchmark of the copy planner: plans per second for a DeepSeek-V3-sized layer.

A layer has 256 routed experts and 3 tensors per expert (bf16 w13 [7168, 4096], bf16 w2
[2048, 7168], fp32 block scales [56, 32]); ranges are built as WeightStore.copy_ranges builds them
(one range per run of consecutive experts of one owner, per tensor). Cases: a full prefetch (all
remote experts) and a partial one (a random half of the remote experts, which fragments the runs),
for group sizes 4 and 8, every policy, chunk sizes 2 and 8 MiB.

Usage: python3 -m perf.bench_planner [--json FILE] [--seconds S] [--min-plans-per-s R]

Prints one row per case; ``--json`` also writes them with the machine, date and commit (the
committed result is perf/results/planner_cpu.json). ``--min-plans-per-s`` exits 1 when a case is
slower, so that a slow planner is noticed (the tests run it with a loose bound).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time

from dwdp_comm import CopyRange, ExpertLayout, make_plan, policies
from dwdp_comm.bench import record

E = 256
TENSORS = {"w13": 7168 * 4096 * 2, "w2": 2048 * 7168 * 2, "scale": 56 * 32 * 4}  # bytes per expert


def layer_ranges(lay: ExpertLayout, experts: list[int]) -> list[CopyRange]:
    """What WeightStore.copy_ranges returns for a composite-mode layer of TENSORS."""
    runs: list[list[int]] = []
    for e in experts:
        o = lay.owner(e)
        if runs and runs[-1][0] == o and runs[-1][1] + runs[-1][2] == e:
            runs[-1][2] += 1
        else:
            runs.append([o, e, 1])
    out, heap_off, slot_off = [], 0, 0
    first, nl = lay.first_expert(lay.rank), lay.num_local_experts
    for nb in TENSORS.values():
        for owner, start, count in runs:
            row = start if start < first else start - nl
            out.append(CopyRange(owner, heap_off + (start - lay.first_expert(owner)) * nb,
                                 slot_off + row * nb, count * nb))
        heap_off += lay.max_local_experts * nb
        slot_off += (E - nl) * nb
    return out


def rate(fn, seconds: float) -> tuple[float, int]:
    fn()  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - t0), n


def _commit() -> str:
    """HEAD's short hash, with "+dirty" when the code measured here differs from it."""
    head = record.commit(short=True) or ""
    dirty = record.is_dirty(("dwdp_comm/planner.py", "dwdp_comm/layout.py", "perf/bench_planner.py"))
    return head + ("+dirty" if dirty and head else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write results to this file")
    ap.add_argument("--seconds", type=float, default=0.5, help="time per case")
    ap.add_argument("--min-plans-per-s", type=float, default=0.0,
                    help="exit 1 if any case plans fewer per second than this")
    args = ap.parse_args()
    rng = random.Random(0)
    rows = []
    print(f"{'G':>2} {'case':>8} {'policy':>12} {'chunk':>6} {'ranges':>7} {'copies':>7} {'plans/s':>9} {'ms/plan':>8}")
    for g in (4, 8):
        lay = ExpertLayout(E, g, 1)
        cases = {"full": lay.remote_experts, "half": sorted(rng.sample(lay.remote_experts, len(lay.remote_experts) // 2))}
        for case, experts in cases.items():
            ranges = layer_ranges(lay, experts)
            for policy in policies():
                for chunk_mib in (2, 8):
                    build = lambda: make_plan(ranges, rank=lay.rank, group_size=g, policy=policy,
                                              chunk_nbytes=chunk_mib << 20)
                    plan = build()
                    per_s, _ = rate(build, args.seconds)
                    rows.append(dict(group_size=g, case=case, policy=policy, chunk_mib=chunk_mib, ranges=len(ranges),
                                     copies=len(plan), plans_per_s=round(per_s, 1), nbytes=plan.total_nbytes))
                    print(f"{g:>2} {case:>8} {policy:>12} {chunk_mib:>4}Mi {len(ranges):>7} {len(plan):>7} "
                          f"{per_s:>9.1f} {1e3 / per_s:>8.2f}", flush=True)
    if args.json:
        commit = _commit()
        meta = dict(benchmark="planner", machine=record.host(), cpu=platform.processor() or platform.machine(),
                    cores=os.cpu_count(), python=platform.python_version(), commit=commit,
                    date=record.utc_date(), experts=E,
                    tensors=len(TENSORS), seconds_per_case=args.seconds)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        print(f"# wrote {args.json}")
    slow = [r for r in rows if r["plans_per_s"] < args.min_plans_per_s]
    if slow:
        for r in slow:
            print(f"# SLOW: G={r['group_size']} {r['case']} {r['policy']} {r['chunk_mib']}Mi: "
                  f"{r['plans_per_s']} plans/s < {args.min_plans_per_s}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

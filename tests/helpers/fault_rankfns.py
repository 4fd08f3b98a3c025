"""Fault cases of the failure model that only the tests run (tests/cpu/test_faults.py); the cases
perf/fault_times.py times live in :mod:`perf.fault_cases`. Also the entry point under torchrun:
``python -m torch.distributed.run --nproc-per-node 2 -m tests.helpers.fault_rankfns stuck``."""

from __future__ import annotations

import sys
import time

import torch

import dwdp_comm as dc
from tests.helpers.stores import SPECS, build_store, error_of, full_truth, same_bytes


def views_after_close(group, num_experts: int, seed: int):
    """weights(), weight_segments() and local() tensors kept past close() stay readable (gather-mode
    names of odd sizes and composite names alike): no crash."""
    st = build_store(group, num_experts, [0], seed)
    pf = dc.Prefetcher(st, depth=1, chunk_nbytes=700)
    h = pf.prefetch(0)
    h.wait()
    kept = {n: (h.weights(n), h.weight_segments(n), st.local(0, n)) for n in SPECS}
    want = {n: full_truth(seed, 0, n, num_experts) for n in SPECS}
    h.release()
    pf.close()
    st.close()
    lay = dc.ExpertLayout(num_experts, group.size, group.rank)
    ok = {}
    for n, (w, segs, loc) in kept.items():  # the memory is still mapped: it holds the last bytes
        ok[n] = (same_bytes(w, want[n]) and all(same_bytes(t, want[n][s:s + t.shape[0]]) for s, t in segs)
                 and same_bytes(loc, want[n][lay.local_experts.start:lay.local_experts.stop]))
    return ok


def write_through_view(group, num_experts: int, seed: int):
    """Rank 0 writes into every row of its prefetched views (composite and gather names) and of its
    local(); no other rank, and no later prefetch, may see the change."""
    st = build_store(group, num_experts, [0], seed)
    pf = dc.Prefetcher(st, depth=1, chunk_nbytes=4096)
    modes = {n: st.slot_mode(0, n) for n in SPECS}
    h = pf.prefetch(0)
    h.wait()
    if group.rank == 0:
        for n in SPECS:
            h.weights(n).view(torch.uint8).bitwise_not_()
            for _, t in h.weight_segments(n):
                t.view(torch.uint8).add_(1)
            st.local(0, n).view(torch.uint8).bitwise_not_()
    h.release()
    group.barrier()
    h = pf.prefetch(0)
    h.wait()
    clean = {n: same_bytes(h.weights(n), full_truth(seed, 0, n, num_experts)) for n in SPECS}
    h.release()
    group.barrier()
    st.close()
    return {"modes": modes, "clean": clean}


def close_order_and_twice(group, seed: int):
    """close() twice, and the store before its prefetcher (or the other way round): no error."""
    out = {}
    st = build_store(group, 5, [0], seed)
    pf = dc.Prefetcher(st)
    pf.prefetch(0).wait()
    out["store_first"] = error_of(lambda: (st.close(), pf.close(), pf.close(), st.close()))
    st = build_store(group, 5, [0], seed)
    pf = dc.Prefetcher(st)
    out["prefetcher_first"] = error_of(lambda: (pf.close(), pf.close(), st.close(), st.close()))
    return out


def group_abort_uses_backend_abort(group):
    """Group.abort() releases the backend with its local abort(), never its (maybe collective) close()."""
    calls = []

    class Recorder:
        def __init__(self, impl):
            self.impl = impl

        def abort(self):
            calls.append("abort")
            self.impl.abort()

        def close(self):
            calls.append("close")
            self.impl.close()

    group.impl = Recorder(group.impl)
    group.abort()
    return calls


def torchrun_main(argv) -> int:
    """Entry point under torchrun (``python -m torch.distributed.run ... -m tests.helpers.fault_rankfns
    stuck``): rank 1 is late by 8 s; rank 0's barrier (timeout 3 s) must name it."""
    import torch.distributed as dist
    dist.init_process_group("gloo")
    g = dc.init("sim", timeout=3)
    if dist.get_rank() == 1:
        time.sleep(8)
        code = 0
    else:
        t0 = time.perf_counter()
        try:
            g.barrier()
            print("RESULT no error", flush=True)
            code = 1
        except dc.DwdpError as exc:
            print(f"RESULT {type(exc).__name__} missing={getattr(exc, 'missing', None)} "
                  f"after {time.perf_counter() - t0:.1f} s: {exc}", flush=True)
            code = 0
    g.abort()
    return code


if __name__ == "__main__":
    sys.exit(torchrun_main(sys.argv[1:]))

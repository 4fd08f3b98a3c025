"""Misuse on every rank (tests/cpu/test_errors.py): each documented misuse raises a clear
DwdpError; inconsistent registrations raise the same CollectiveMismatchError everywhere."""

from __future__ import annotations

import torch

import dwdp_comm as dc
from tests.helpers.stores import error_of


def usage_errors(group, seed: int):
    """Every documented misuse raises a clear DwdpError (collected per case)."""
    out = {}
    lay = dc.ExpertLayout(6, group.size, group.rank)
    st = dc.WeightStore(group, lay)
    shard = torch.zeros(lay.num_local_experts, 4, 1024)
    st.register(0, "w", shard)
    out["duplicate"] = error_of(lambda: st.register(0, "w", shard))
    out["bad_layer"] = error_of(lambda: st.register(-1, "w", shard))
    out["bad_name"] = error_of(lambda: st.register(0, "", shard))
    out["bad_shard"] = error_of(lambda: st.register(0, "x", 3.0))
    out["scalar_shard"] = error_of(lambda: st.register(0, "x", torch.tensor(1.0)))
    out["prefetcher_before_commit"] = error_of(lambda: dc.Prefetcher(st))
    st.commit()
    out["register_after_commit"] = error_of(lambda: st.register(1, "w", shard))
    out["commit_twice"] = error_of(st.commit)
    out["depth0"] = error_of(lambda: dc.Prefetcher(st, depth=0))
    out["chunk0"] = error_of(lambda: dc.Prefetcher(st, chunk_nbytes=0))
    out["chunk_neg"] = error_of(lambda: dc.Prefetcher(st, chunk_nbytes=-5))
    out["schedule"] = error_of(lambda: dc.Prefetcher(st, schedule="fastest"))
    pf = dc.Prefetcher(st, depth=1)
    out["unregistered_layer"] = error_of(lambda: pf.prefetch(7))
    out["bad_experts"] = error_of(lambda: pf.prefetch(0, experts=[99]))
    h = pf.prefetch(0)
    out["weights_before_wait"] = error_of(lambda: h.weights("w"))
    h.wait()
    out["unregistered_name"] = error_of(lambda: h.weights("nope"))
    h.release()
    out["weights_after_release"] = error_of(lambda: h.weights("w"))
    out["release_twice"] = error_of(h.release)
    pf.close()
    out["prefetch_after_close"] = error_of(lambda: pf.prefetch(0))
    out["close_twice"] = error_of(pf.close)
    st.close()
    out["store_after_close"] = error_of(lambda: st.local(0, "w"))
    out["store_close_twice"] = error_of(st.close)
    out["prefetcher_on_closed_store"] = error_of(lambda: dc.Prefetcher(st))
    group.close()
    out["group_close_twice"] = error_of(group.close)
    out["store_on_closed_group"] = error_of(lambda: dc.WeightStore(group, lay))
    return out


def mismatched_commit(group, case: str):
    """Ranks register inconsistently; every rank must raise the same CollectiveMismatchError."""
    lay = dc.ExpertLayout(7, group.size, group.rank)
    st = dc.WeightStore(group, lay)
    n = lay.num_local_experts
    last = group.rank == group.size - 1
    if case == "dtype":
        st.register(0, "w", torch.zeros(n, 3, dtype=torch.float16 if last else torch.float32))
    elif case == "shape":
        st.register(0, "w", torch.zeros(n, 4 if last else 3))
    elif case == "missing_name":
        st.register(0, "w", torch.zeros(n, 3))
        if not last:
            st.register(0, "scale", torch.zeros(n, 1))
    elif case == "missing_layer":
        st.register(0, "w", torch.zeros(n, 3))
        if last:
            st.register(5, "w", torch.zeros(n, 3))
    elif case == "shard_size":
        st.register(0, "w", torch.zeros(n + (1 if last else 0), 3))
    elif case == "nothing":
        pass
    try:
        st.commit()
    except dc.CollectiveMismatchError as exc:
        return str(exc)
    return None

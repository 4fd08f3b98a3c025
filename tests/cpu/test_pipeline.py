"""DwdpPipeline on its own (sim backend, 2 ranks): begin / acquire / release / reset order, an
aborted forward followed by a good one, layer_stats, prepare_capture, and its errors. Every
acquired layer's weights are checked byte for byte against the seeded truth."""

import pytest

import dwdp_comm as dc
from tests.helpers import stores
from dwdp_comm.moe import DwdpPipeline

E = 5  # uneven over 2 ranks
LAYERS = [3, 1, 4]  # forward order, neither sorted nor consecutive


def _check(h, seed):
    for name in stores.SPECS:
        assert stores.same_bytes(h.weights(name), stores.full_truth(seed, h.layer, name, E)), (h.layer, name)


def _forward(pipe, seed, layers=LAYERS):
    pipe.begin()
    for l in layers:
        h = pipe.acquire(l)
        assert h.layer == l
        _check(h, seed)
        pipe.release(h)


def _err(fn):
    try:
        fn()
    except dc.DwdpError as exc:
        return type(exc).__name__, str(exc)
    return None


def order_and_recovery(group, seed):
    st = stores.build_store(group, E, LAYERS, seed)
    remote = {l: st.remote_nbytes(l) for l in LAYERS}
    lay = st.layout
    # what one prefetch copies: the remote experts, plus the local ones of gather-mode names
    copied = {l: remote[l] + sum(lay.num_local_experts * st.spec(l, n).expert_nbytes
                                 for n in stores.SPECS if st.slot_mode(l, n) == "gather") for l in LAYERS}
    pf = dc.Prefetcher(st, depth=2, chunk_nbytes=4096)
    pipe = DwdpPipeline(pf, LAYERS)
    out = {"before_begin": _err(lambda: pipe.acquire(3))}
    pipe.begin()  # the first depth layers are in flight, nothing else
    out["after_begin"] = pf.nbytes_prefetched == copied[3] + copied[1]
    sent = []
    for l in LAYERS:  # acquire issues the layer depth places later; release submits it (same slot)
        h = pipe.acquire(l)
        _check(h, seed)
        before = pf.nbytes_prefetched
        pipe.release(h)
        sent.append(pf.nbytes_prefetched - before)
        out.setdefault("double_release", _err(lambda: h.release()))
    out["submitted_at_release"] = sent == [copied[LAYERS[(i + 2) % 3]] for i in range(3)]
    out["out_of_order"] = _err(lambda: pipe.acquire(4))  # the next forward starts with layer 3
    _forward(pipe, seed)  # wraps around: layer 3 and 1 were prefetched during the last forward
    # An aborted forward (raised after acquiring layer 1, nothing released), then a good one.
    pipe.begin()
    pipe.release(pipe.acquire(3))
    held = pipe.acquire(1)
    assert not held.released
    pipe.begin()  # notices the half-done forward: resets
    out["aborted_released"] = held.released
    _forward(pipe, seed)
    _forward(pipe, seed)
    # reset() in the middle starts again from the first layer.
    pipe.begin()
    pipe.release(pipe.acquire(3))
    pipe.reset()
    _forward(pipe, seed)
    stats = pipe.layer_stats(reset=True)
    out["stats"] = {l: (s["acquires"], s["bytes_pulled"] == s["acquires"] * remote[l], s["exposed_wait_s"] >= 0)
                    for l, s in stats.items()}
    out["stats_after_reset"] = {l: s["acquires"] for l, s in pipe.layer_stats().items()}
    out["exposed"] = pipe.exposed_seconds() >= 0
    # prepare_capture works on every backend: idle pipeline, a fresh start at the next begin().
    pipe.prepare_capture()
    out["idle_after_prepare"] = (pf.synchronize() is None and not pipe.capturing)
    _forward(pipe, seed)
    pipe.close()
    out["after_close"] = _err(lambda: pipe.acquire(3))
    _forward(pipe, seed)  # begin() after close() starts again
    pipe.close()
    # depth larger than the forward: layer 3 is in flight twice; two forwards in a row.
    pf4 = dc.Prefetcher(st, depth=4, chunk_nbytes=4096)
    pipe4 = DwdpPipeline(pf4, LAYERS)
    _forward(pipe4, seed)
    _forward(pipe4, seed)
    pipe4.close()
    out["bad_args"] = [_err(lambda: DwdpPipeline(pf, [])), _err(lambda: DwdpPipeline(pf, [3, 99])),
                       _err(lambda: DwdpPipeline("pf", [3]))]
    st.close()
    return out


def test_pipeline_order_recovery_stats_and_errors(seed):
    res = dc.testing.launch(order_and_recovery, 2, seed, backend="sim", timeout=180)
    for r in res:
        kind, msg = r["before_begin"]
        assert kind == "DwdpError" and "was not prefetched" in msg and "begin()" in msg
        assert r["after_begin"] and r["submitted_at_release"]
        kind, msg = r["out_of_order"]
        assert kind == "DwdpError" and "layer 4" in msg and str(LAYERS) in msg
        assert r["aborted_released"], "begin() after an aborted forward must release its held handle"
        acq = {l: a for l, (a, ok_bytes, ok_wait) in r["stats"].items()}
        assert all(ok_bytes and ok_wait for _, ok_bytes, ok_wait in r["stats"].values())
        # full forwards: 1st, 2nd, two after the abort, one after reset = 5; partial: aborted (3, 1), reset (3)
        assert acq == {3: 5 + 2, 1: 5 + 1, 4: 5}, acq
        assert r["stats_after_reset"] == {3: 0, 1: 0, 4: 0}
        assert r["exposed"]
        kind, msg = r["double_release"]
        assert kind == "DwdpError" and "released twice" in msg
        assert r["idle_after_prepare"]
        kind, msg = r["after_close"]
        assert kind == "DwdpError" and "was not prefetched" in msg
        (k1, m1), (k2, m2), (k3, m3) = r["bad_args"]
        assert k1 == "InvalidArgumentError" and m1.startswith("layers: ")
        assert k2 == "InvalidArgumentError" and "[99]" in m2 and "committed layers" in m2
        assert k3 == "InvalidArgumentError" and m3.startswith("prefetcher: ") and "Prefetcher" in m3

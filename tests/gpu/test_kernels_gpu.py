"""Grouped GEMM on a CUDA GPU: torch path, Numba kernel, fp8, composite views, against the reference.

Marked ``gpu``: skipped cleanly where torch sees no CUDA device. Fresh random data per test (the
seed is printed on failure); the oracle is the float64 reference on the same device.

Run: ``python -m pytest tests/gpu/test_kernels_gpu.py -q -rs``
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import dwdp_comm.kernels as K
from dwdp_comm.errors import BackendUnavailableError, InvalidArgumentError
from dwdp_comm.kernels import capabilities
from dwdp_comm.kernels.token_groups import upload_ints
from dwdp_comm.kernels.workers import WorkerStreams
from tests.helpers.kernel_cases import TOL, make_case, random_sizes, ref64, rel_err, split_forms

pytestmark = pytest.mark.gpu
DEV = "cuda"

SHAPES = {  # (E, K, N, T)
    "aligned": (16, 256, 384, 1500),
    "odd": (7, 100, 77, 301),
    "deepseek_down_slice": (8, 2048, 512, 700),
}


def _numba_or_skip():
    why = K.available_backends(DEV, reasons=True)["numba"]
    if why:
        pytest.skip(f"numba backend unavailable: {why}")


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


# ---- torch path ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_torch_path_every_form(seed, dtype, shape):
    E, Kd, N, T = SHAPES[shape]
    x, sizes, w = make_case(seed, E, Kd, N, T, dtype, device=DEV)
    ref = ref64(x, sizes, w)
    for name, form in split_forms(w, seed).items():
        info = {}
        out = K.grouped_gemm(x, sizes, form, backend="torch", info=info)
        torch.cuda.synchronize()
        assert out.device.type == "cuda" and out.dtype == dtype and out.shape == (T, N)
        err = rel_err(out, ref)
        assert err < TOL[dtype], f"{shape}/{name}: rel err {err:.3g} ({info})"
    if shape == "aligned" and dtype == torch.bfloat16:
        info = {}
        K.grouped_gemm(x, sizes, w, info=info)
        assert info["method"] == "grouped_mm", info  # the fast path really ran


@pytest.mark.parametrize("method", ["segments", "segments_async", "segments_direct", "per_expert"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_torch_split_methods(seed, method, dtype):
    min_rows = 100  # segments_direct: a mix of both kinds
    x, sizes, w = make_case(seed, 12, 128, 256, 900, dtype, device=DEV, empty_frac=0.4)
    ref = ref64(x, sizes, w)
    for name in ("dwdp_3_pieces", "per_owner", "per_expert"):
        out = K.grouped_gemm(x, sizes, split_forms(w, seed)[name], backend=f"torch:{method}",
                             direct_min_rows=min_rows)
        assert rel_err(out, ref) < TOL[dtype], name
    # back-to-back calls, results read on the current stream only: the async copies must be waited for
    forms = split_forms(w, seed)["dwdp_3_pieces"]
    outs = [K.grouped_gemm(x, sizes, forms, backend=f"torch:{method}", direct_min_rows=min_rows)
            for _ in range(4)]
    sums = [o.float().sum() for o in outs]
    torch.cuda.synchronize()
    assert all(rel_err(o, ref) < TOL[dtype] for o in outs) and all(torch.isfinite(s) for s in sums)


@pytest.mark.parametrize("sizes", [[0, 0, 50, 0], [50, 0, 0, 0], [0, 0, 0, 50], [1, 1, 1, 47], [0, 0, 0, 0]])
def test_empty_and_lopsided_groups(seed, sizes):
    T = sum(sizes)
    x, _, w = make_case(seed, 4, 64, 32, T, torch.bfloat16, device=DEV)
    for form in (w, [w[:1], w[1:3], w[3:]], [w[:2], w[2:]]):
        out = K.grouped_gemm(x, sizes, form)
        assert out.shape == (T, 32)
        if T:
            assert rel_err(out, ref64(x, sizes, w)) < 1e-2


def test_device_offsets_input(seed):
    x, sizes, w = make_case(seed, 8, 64, 64, 400, torch.bfloat16, device=DEV)
    offs = torch.tensor(np.cumsum(sizes), dtype=torch.int32, device=DEV)
    for arg, kw in ((offs, {"offsets": True}), (torch.tensor(sizes, device=DEV), {})):
        assert rel_err(K.grouped_gemm(x, arg, [w[:3], w[3:]], **kw), ref64(x, sizes, w)) < 1e-2


@pytest.fixture
def _sync_is_an_error():
    """Inside: any synchronising CUDA call raises (torch.cuda.set_sync_debug_mode)."""
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(old)


def test_fast_paths_do_not_synchronise(seed):
    """Host counts (list, numpy, CPU tensor), a reused TokenGroups, or device counts with
    validate=False: the torch paths (one tensor, split pieces, out=) enqueue without a sync."""
    x, sizes, w = make_case(seed, 16, 128, 256, 1500, torch.bfloat16, device=DEV)
    pieces = [(0, w[:4]), (4, w[4:8].clone()), (8, w[8:12].clone()), (12, w[12:].clone())]
    ref = ref64(x, sizes, w)
    dev_counts = torch.tensor(sizes, device=DEV)
    dev_offs = torch.tensor(np.cumsum(sizes), dtype=torch.int32, device=DEV)
    groups = K.TokenGroups(sizes)
    K.grouped_gemm(x, groups, w), K.grouped_gemm(x, groups, pieces)  # probes and caches, outside the check
    torch.cuda.synchronize()
    outs = []
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for arg in (sizes, np.asarray(sizes), torch.tensor(sizes), groups):
            for form in (w, pieces):
                for backend in ("torch", "torch:segments"):
                    outs.append(K.grouped_gemm(x, arg, form, backend=backend))
        for arg in (K.TokenGroups(dev_counts, validate=False), K.TokenGroups(dev_offs, offsets=True, validate=False),
                    K.TokenGroups(dev_offs.long(), offsets=True, validate=False)):
            outs.append(K.grouped_gemm(x, arg, w))
        out = torch.empty(1500, 256, dtype=torch.bfloat16, device=DEV)
        outs.append(K.grouped_gemm(x, sizes, pieces, out=out))
        outs.append(K.grouped_gemm(x, groups, w, out=torch.empty_like(out)))
    finally:
        torch.cuda.set_sync_debug_mode(old)
    torch.cuda.synchronize()
    for i, o in enumerate(outs):
        assert rel_err(o, ref) < 1e-2, i


def test_float32_avoids_torchs_syncing_fallback(seed, _sync_is_an_error):
    """torch._grouped_mm has no float32 CUDA kernel (its fallback copies offs to the host): auto
    takes the per-expert loop, which needs no sync."""
    torch.cuda.set_sync_debug_mode(0)
    x, sizes, w = make_case(seed, 8, 96, 80, 500, torch.float32, device=DEV)
    ref = ref64(x, sizes, w)
    assert not capabilities.has_device_kernel(torch.device(DEV), torch.float32)
    K.grouped_gemm(x, sizes, w)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    infos, outs = [], []
    for form in (w, [w[:3], w[3:]]):
        info = {}
        outs.append(K.grouped_gemm(x, sizes, form, info=info))
        infos.append(info)
    torch.cuda.set_sync_debug_mode(0)
    assert all(i["method"] == "per_expert" and "fallback" in i for i in infos), infos
    assert all(rel_err(o, ref) < 1e-5 for o in outs)


def test_validated_device_counts_sync_once_and_are_correct(seed):
    x, sizes, w = make_case(seed, 8, 64, 64, 400, torch.bfloat16, device=DEV)
    ref = ref64(x, sizes, w)
    for values, kw in ((torch.tensor(sizes, device=DEV), {}), (torch.tensor(sizes, device=DEV, dtype=torch.int32), {}),
                       (torch.tensor(np.cumsum(sizes), device=DEV), {"offsets": True})):
        lazy = K.TokenGroups(values, validate=False, **kw)
        assert rel_err(K.grouped_gemm(x, lazy, w), ref) < 1e-2
        assert not lazy.on_host
        assert rel_err(K.grouped_gemm(x, lazy, [w[:3], w[3:5], w[5:]]), ref) < 1e-2  # fetches the host rows
        assert lazy.on_host and lazy.sizes.tolist() == sizes
        eager = K.TokenGroups(values, **kw)
        assert eager.on_host and rel_err(K.grouped_gemm(x, eager, [w[:3], w[3:]]), ref) < 1e-2
    with pytest.raises(InvalidArgumentError, match="m_sizes"):
        K.TokenGroups(torch.tensor([3, -1], device=DEV))


def test_upload_is_asynchronous_and_correct(_sync_is_an_error):
    vals = np.arange(1000, dtype=np.int64) * 3
    ts = [upload_ints(vals + i, torch.device(DEV)) for i in range(50)]  # the staging blocks get reused
    torch.cuda.set_sync_debug_mode(0)
    assert all(t.dtype == torch.int32 and t.device.type == "cuda" for t in ts)
    assert all(t.cpu().numpy().tolist() == (vals + i).tolist() for i, t in enumerate(ts))


@pytest.mark.parametrize("method", ["segments", "segments_async", "segments_direct"])
def test_split_out_and_stream_safety(seed, method):
    """Many calls back to back on one stream, results kept and dropped at random, out= buffers
    reused: the side-stream copies never read freed temporaries nor write after the join."""
    min_rows = 150  # segments_direct: some direct, some runs
    x, sizes, w = make_case(seed, 16, 256, 512, 3000, torch.bfloat16, device=DEV, empty_frac=0.2)
    pieces = [(0, w[:4]), (4, w[4:8].clone()), (8, w[8:12].clone()), (12, w[12:].clone())]
    ref = ref64(x, sizes, w)
    g = K.TokenGroups(sizes)
    rng = np.random.default_rng(seed)
    kept, out = [], torch.empty(3000, 512, dtype=torch.bfloat16, device=DEV)
    for i in range(30):
        if i % 3 == 0:
            r = K.grouped_gemm(x, g, pieces, out=out, backend=f"torch:{method}", direct_min_rows=min_rows)
            assert r is out
            kept.append(r.clone())
        else:
            r = K.grouped_gemm(x, g, pieces, backend=f"torch:{method}", direct_min_rows=min_rows)
            junk = torch.randn(int(rng.integers(1, 2000)), 512, device=DEV).bfloat16()  # reuse freed blocks
            if rng.random() < 0.5:
                kept.append(r)
            del junk
    torch.cuda.synchronize()
    for i, k in enumerate(kept):
        assert rel_err(k, ref) < 1e-2, i


@pytest.mark.parametrize("pieces", [2, 4, 9])
def test_worker_streams_many_calls(seed, pieces):
    """segments_async and moe_mlp's run_rows on worker streams: more pieces than workers (9 > 4),
    back-to-back calls with results dropped and blocks reused in between, every result right."""
    E = 18
    x, sizes, w = make_case(seed, E, 128, 256, 2000, torch.bfloat16, device=DEV, empty_frac=0.2)
    cuts = np.linspace(0, E, pieces + 1).astype(int).tolist()
    split = [(a, w[a:b].clone()) for a, b in zip(cuts[:-1], cuts[1:])]
    ref = ref64(x, sizes, w)
    g = K.TokenGroups(sizes)
    info = {}
    K.grouped_gemm(x, g, split, info=info, backend="torch:segments_async")
    assert info["method"] == "segments_async" and info["streams"] == min(pieces - 1, 4), info
    K.grouped_gemm(x, g, split, info=info)
    assert info["method"] == "segments_direct" and 1 <= info["streams"] <= 4, info  # the default
    kept = []
    for i in range(20):
        r = K.grouped_gemm(x, g, split, backend="torch:segments_async" if i % 4 == 3 else "torch")
        junk = torch.randn(int(1000 + 37 * i), 256, device=DEV).bfloat16()  # reuse freed blocks at once
        kept.append(r if i % 2 else r.clone())
        del junk, r
    I = 64
    w13 = (torch.randn(E, 128, 2 * I, device=DEV) / math.sqrt(128)).bfloat16()
    w2 = (torch.randn(E, I, 128, device=DEV) / math.sqrt(I)).bfloat16()
    s13 = [(a, w13[a:b].clone()) for a, b in zip(cuts[:-1], cuts[1:])]
    s2 = [(a, w2[a:b].clone()) for a, b in zip(cuts[:-1], cuts[1:])]
    want = K.moe_mlp(x, sizes, w13, w2, backend="reference")
    mi = {}
    moes = [K.moe_mlp(x, g, s13, s2, info=mi, backend="torch:segments_async") for _ in range(3)]
    assert mi["gate_up"]["method"] == "grouped_mm_rows" and mi["gate_up"]["streams"] == min(pieces, 4), mi
    moes += [K.moe_mlp(x, g, s13, s2, info=mi) for _ in range(3)]
    assert mi["gate_up"]["method"] == mi["down"]["method"] == "segments_direct", mi
    torch.cuda.synchronize()
    assert all(rel_err(k, ref) < 1e-2 for k in kept)
    assert all(rel_err(m, want) < 2e-2 for m in moes)


def test_side_stream(seed):
    x, sizes, w = make_case(seed, 8, 128, 128, 600, torch.bfloat16, device=DEV)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out = K.grouped_gemm(x, sizes, [w[:5], w[5:]])
    s.synchronize()
    assert rel_err(out, ref64(x, sizes, w)) < 1e-2


def test_worker_streams_follow_the_caller_stream(seed):
    """Split GEMMs issued alternately from a high- and a normal-priority stream: each caller gets
    its own workers at its own priority, results are right on every caller stream."""
    x, sizes, w = make_case(seed, 12, 128, 256, 1500, torch.bfloat16, device=DEV, empty_frac=0.1)
    pieces = [w[:3], w[3:6].clone(), w[6:9].clone(), w[9:].clone()]
    ref = ref64(x, sizes, w)
    lo_pri, hi_pri = torch.cuda.Stream.priority_range()
    callers = [torch.cuda.Stream(priority=hi_pri), torch.cuda.Stream(priority=lo_pri)]
    for s in callers:
        s.wait_stream(torch.cuda.current_stream())
    outs = []
    for i in range(8):
        s = callers[i % 2]
        with torch.cuda.stream(s):
            backend = "torch:segments_async" if i % 4 < 2 else "torch"
            outs.append(K.grouped_gemm(x, sizes, pieces, backend=backend))
    torch.cuda.synchronize()
    assert all(rel_err(o, ref) < 1e-2 for o in outs)
    for s in callers:
        pool = WorkerStreams.pool_of(s)
        assert pool and all(wk.priority == s.priority for wk in pool), (s.priority, [wk.priority for wk in pool])
    assert callers[0].priority != callers[1].priority


def test_weights_on_another_device_are_refused(seed):
    x, sizes, w = make_case(seed, 4, 32, 32, 40, torch.float32, device=DEV)
    other = "cuda:1" if torch.cuda.device_count() > 1 else "cpu"
    with pytest.raises(InvalidArgumentError, match="device"):
        K.grouped_gemm(x, sizes, [w[:2], w[2:].to(other)])
    with pytest.raises(InvalidArgumentError, match="device"):
        K.grouped_gemm(x.to(other), sizes, w)


# ---- composite view (VMM) ------------------------------------------------------------------------
def composite_rank(group, seed: int) -> dict:
    """On one ``cuda_ipc`` rank: the experts of ``w`` copied into 3 buffers of the backend (one
    physical allocation each), mapped back to back by the backend's ``compose``
    (:class:`dwdp_comm.bench.split_weights.SplitWeights`): one ``[E, K, N]`` view, no copy.
    Returns the errors against the reference of the view, of the pieces and (where Numba runs)
    of the pieces on the Numba backend."""
    from dwdp_comm.bench.split_weights import SplitWeights
    E, Kd, N = 8, 1024, 1024  # one bf16 expert = 2 MiB, the VMM granularity on H100 / H200
    x, sizes, w = make_case(seed, E, Kd, N, 1000, torch.bfloat16, device=group.device)
    sw = SplitWeights(group, w, [0, 2, 5, 8])
    try:
        if sw.composite is None:
            return {"skip": sw.why_not}
        view, segments = sw.composite, sw.segments
        ref = ref64(x, sizes, w)
        info = {}
        out = {"composite": rel_err(K.grouped_gemm(x, sizes, view, info=info), ref), "method": info["method"],
               "segments": rel_err(K.grouped_gemm(x, sizes, segments), ref),
               "zero_copy": all(view.data_ptr() != p.data_ptr() for _, p in segments) and torch.equal(view, w)}
        why = K.available_backends(group.device, reasons=True)["numba"]
        out["numba"] = why or rel_err(K.grouped_gemm(x, sizes, segments, backend="numba"), ref)
        return out
    finally:
        sw.close()


def test_vmm_composite_view(seed):
    """Pieces in separate physical allocations, mapped back to back by the library's own VMM
    composite (cuda_ipc ``compose``, one rank): one [E, K, N] tensor, one torch._grouped_mm."""
    import dwdp_comm as dc
    res = dc.testing.launch(composite_rank, 1, seed, backend="cuda_ipc", timeout=180)[0]
    if "skip" in res:
        pytest.skip(f"VMM composite unavailable: {res['skip']}")
    assert res["zero_copy"], res
    assert res["composite"] < 1e-2 and res["method"] == "grouped_mm", res
    assert res["segments"] < 1e-2, res
    if isinstance(res["numba"], str):
        pytest.skip(f"numba backend unavailable: {res['numba']}")
    assert res["numba"] < 1e-2, res


# ---- Numba kernel on the GPU ---------------------------------------------------------------------
@pytest.mark.parametrize("config", ["128x128x8", "64x128x8", "64x64x16", "16x16x4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_numba_kernel(seed, config, dtype):
    _numba_or_skip()
    for shape in ("odd", "aligned"):
        E, Kd, N, T = SHAPES[shape]
        for layout in ("kn", "nk"):
            x, sizes, w = make_case(seed, E, Kd, N, T, dtype, device=DEV, layout=layout)
            ref = ref64(x, sizes, w)
            forms = split_forms(w, seed)
            for name in ("tensor", "dwdp_3_pieces", "per_expert", "separate_allocs"):
                info = {}
                out = K.grouped_gemm(x, sizes, forms[name], backend=f"numba:{config}", info=info)
                assert info["method"] == "numba"
                err = rel_err(out, ref)
                assert err < TOL[dtype], f"{shape}/{layout}/{name}: rel err {err:.3g}"


def test_numba_kernel_edges(seed):
    _numba_or_skip()
    for sizes in ([0, 0, 300, 0], [1, 0, 0, 0], [0, 0, 0, 0]):
        T = sum(sizes)
        x, _, w = make_case(seed, 4, 33, 65, T, torch.float32, device=DEV)
        out = K.grouped_gemm(x, sizes, [w[:1], w[1:]], backend="numba")
        assert out.shape == (T, 65)
        if T:
            assert rel_err(out, ref64(x, sizes, w)) < 1e-5
    x, sizes, w = make_case(seed, 5, 64, 48, 200, torch.bfloat16, device=DEV)
    out = torch.full((200, 48), float("nan"), dtype=torch.bfloat16, device=DEV)
    assert K.grouped_gemm(x, sizes, w, out=out, backend="numba") is out
    assert rel_err(out, ref64(x, sizes, w)) < 1e-2
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out2 = K.grouped_gemm(x, sizes, [w[:2], w[2:]], backend="numba")
    s.synchronize()
    assert rel_err(out2, ref64(x, sizes, w)) < 1e-2


# ---- fp8 -----------------------------------------------------------------------------------------
def _fp8_or_skip():
    why = capabilities.fp8_unavailable_reason(torch.device(DEV))
    if why:
        pytest.skip(f"fp8 grouped GEMM unavailable here: {why}")


def _fp8_weights(seed, E, Kd, N):
    g = torch.Generator().manual_seed(seed)
    w_real = (torch.randn(E, N, Kd, generator=g) / math.sqrt(Kd)).to(DEV)
    scales = (w_real.abs().amax(dim=2) / 448.0).float()
    wq = (w_real / scales[:, :, None]).to(torch.float8_e4m3fn).transpose(1, 2)  # [E, K, N] K-contiguous
    return wq, scales


@pytest.mark.parametrize("shape", [(16, 256, 512, 1200), (8, 2048, 256, 500)])
def test_fp8_torch_path(seed, shape):
    _fp8_or_skip()
    E, Kd, N, T = shape
    wq, scales = _fp8_weights(seed, E, Kd, N)
    x = torch.randn(T, Kd, device=DEV).bfloat16()
    sizes = random_sizes(np.random.default_rng(seed), E, T)
    ref = K.grouped_gemm(x, sizes, wq, weight_scales=scales, backend="reference")
    for form, scl in ((wq, scales), ([wq[:3], wq[3:]], [scales[:3], scales[3:]]),
                      ([(0, wq[:5]), (5, wq[5:])], scales)):
        info = {}
        out = K.grouped_gemm(x, sizes, form, weight_scales=scl, info=info)
        assert info["backend"] == "torch" and "scaled" in info["method"], info
        assert rel_err(out, ref) < 1e-2, info
        if not isinstance(form, torch.Tensor):
            buf = torch.full((T + 2, N), float("nan"), device=DEV, dtype=torch.bfloat16)
            got = K.grouped_gemm(x, sizes, form, weight_scales=scl, out=buf[1:-1], info=info)
            assert info["method"] == "scaled_segments_async" and got.data_ptr() == buf[1].data_ptr(), info
            assert rel_err(buf[1:-1], ref) < 1e-2 and torch.isnan(buf[[0, -1]].float()).all()


def test_fp8_row_major_weights_refused(seed):
    _fp8_or_skip()
    wq, scales = _fp8_weights(seed, 4, 64, 64)
    x = torch.randn(40, 64, device=DEV).bfloat16()
    with pytest.raises((BackendUnavailableError, RuntimeError)):
        K.grouped_gemm(x, [10] * 4, wq.contiguous(), weight_scales=scales, backend="torch")


# ---- MoE MLP -------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_moe_mlp(seed, backend):
    if backend == "numba":
        _numba_or_skip()
    E, H, I, T = 8, 256, 128, 800
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).bfloat16().to(DEV)
    w13 = (torch.randn(E, H, 2 * I, generator=g) / math.sqrt(H)).bfloat16().to(DEV)
    w2 = (torch.randn(E, I, H, generator=g) / math.sqrt(I)).bfloat16().to(DEV)
    sizes = random_sizes(np.random.default_rng(seed), E, T)
    want = K.moe_mlp(x, sizes, w13, w2, backend="reference")
    got = K.moe_mlp(x, sizes, [(0, w13[:2]), (2, w13[2:6]), (6, w13[6:])], [w2[:4], w2[4:]], backend=backend)
    assert rel_err(got, want) < 2e-2


def test_moe_mlp_fp8(seed):
    _fp8_or_skip()
    E, H, I, T = 8, 256, 128, 800
    q13, s13 = _fp8_weights(seed, E, H, 2 * I)
    q2, s2 = _fp8_weights(seed + 1, E, I, H)
    x = torch.randn(T, H, device=DEV).bfloat16()
    sizes = random_sizes(np.random.default_rng(seed), E, T)
    want = K.moe_mlp(x, sizes, q13, q2, w13_scales=s13, w2_scales=s2, backend="reference")
    info = {}
    got = K.moe_mlp(x, sizes, [(0, q13[:3]), (3, q13[3:])], [q2[:5], q2[5:]], w13_scales=s13,
                    w2_scales=[s2[:5], s2[5:]], info=info)
    assert info["gate_up"]["method"] == "scaled_rows" and info["down"]["method"] == "scaled_segments_async", info
    assert rel_err(got, want) < 2e-2


def test_available_backends_on_gpu():
    status = K.available_backends(DEV, reasons=True)
    assert status["torch"] is None and status["reference"] is None
    print(status)

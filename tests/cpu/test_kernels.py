"""Grouped GEMM over split weights (CPU): reference, torch path, every weight form, validation.

Every check compares against the float64 reference on fresh random data (seeded per test, the
seed printed on failure); the cases (rel_err, make_case, split_forms, ...) are in
tests/helpers/kernel_cases.py, shared with test_kernels_numba_sim.py and tests/gpu/test_kernels_gpu.py.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
try:  # optional: the GPU machine may lack it
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:
    given = None

import dwdp_comm.kernels as K
from dwdp_comm.errors import BackendUnavailableError, InvalidArgumentError, InvalidTypeError
from dwdp_comm.kernels import capabilities, reference, segments, token_groups, torch_path
from tests.helpers.kernel_cases import TOL, cuts, make_case, random_sizes, ref64, rel_err, split_forms

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---- helpers (shared with the other kernel test files) ------------------------------------------
def test_reference_matches_numpy_loop(seed):
    x, sizes, w = make_case(seed, 5, 19, 11, 40, torch.float32)
    got = ref64(x, sizes, w).numpy()
    xs, ws = x.double().numpy(), w.double().numpy()
    want = np.zeros((40, 11))
    r = 0
    for e, m in enumerate(sizes):
        want[r:r + m] = xs[r:r + m] @ ws[e]
        r += m
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_rel_err_never_passes_nan():
    ref = torch.ones(4, 3)
    bad = ref.clone()
    bad[2, 1] = float("nan")
    assert rel_err(bad, ref) == math.inf
    bad[2, 1] = float("inf")
    assert rel_err(bad, ref) == math.inf
    assert rel_err(ref[:3], ref) == math.inf
    assert rel_err(ref, ref) == 0.0


# ---- torch path on every form --------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(6, 32, 48, 70), (5, 37, 23, 41), (1, 16, 16, 9), (7, 8, 24, 0)],
                         ids=["aligned", "odd", "one_expert", "no_tokens"])
def test_torch_path_every_form(seed, dtype, shape):
    E, Kd, N, T = shape
    x, sizes, w = make_case(seed, E, Kd, N, T, dtype)
    ref = ref64(x, sizes, w)
    for name, form in split_forms(w, seed).items():
        info = {}
        out = K.grouped_gemm(x, sizes, form, backend="torch", info=info)
        assert out.shape == (T, N) and out.dtype == dtype, name
        assert info["backend"] == "torch" and info["method"], name
        if T:
            err = rel_err(out, ref)
            assert err < TOL[dtype], f"{name}: rel err {err:.3g} ({info})"


@pytest.mark.parametrize("method", ["grouped_mm", "segments", "segments_async", "segments_direct", "per_expert"])
def test_forced_methods(seed, method):
    x, sizes, w = make_case(seed, 6, 32, 16, 50, torch.float32)
    ref = ref64(x, sizes, w)
    form = w if method == "grouped_mm" else split_forms(w, seed)["dwdp_3_pieces"]
    info = {}
    out = K.grouped_gemm(x, sizes, form, backend=f"torch:{method}", info=info)
    assert info["method"] == method
    assert rel_err(out, ref) < 1e-5


def test_grouped_mm_method_rejects_split(seed):
    x, sizes, w = make_case(seed, 4, 16, 16, 20, torch.float32)
    with pytest.raises(InvalidArgumentError, match="method"):
        K.grouped_gemm(x, sizes, [w[:2], w[2:]], backend="torch:grouped_mm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transposed_and_strided_weights(seed, dtype):
    """[E, N, K] storage passed as a transpose, padded strides, and an expert-strided slice."""
    E, Kd, N, T = 5, 24, 40, 60
    x, sizes, w_nk = make_case(seed, E, Kd, N, T, dtype, layout="nk")
    padded = torch.randn(E, Kd, N + 8).to(dtype)[:, :, :N]
    every_other = torch.randn(2 * E, Kd, N).to(dtype)[::2]
    for w in (w_nk, padded, every_other):
        ref = ref64(x, sizes, w)
        for name, form in split_forms(w, seed).items():
            assert rel_err(K.grouped_gemm(x, sizes, form), ref) < TOL[dtype], name


def test_composite_view_from_sim_buffers(seed, tmp_path):
    """A real composite (pieces of two shared-memory buffers mapped back to back) as one tensor."""
    from dwdp_comm.backends.sim import PAGE, SimBuffer, SimComposite
    Kd, N = 32, 32  # one float32 expert = 4 KiB
    nb = Kd * N * 4
    if nb % PAGE:
        pytest.skip(f"page size {PAGE} is not {nb}")
    E = 6
    a, b = SimBuffer(str(tmp_path / "a"), 4 * nb), SimBuffer(str(tmp_path / "b"), 2 * nb)
    x, sizes, w = make_case(seed, E, Kd, N, 50, torch.float32)
    a.tensor().view(torch.float32).view(4, Kd, N)[:2].copy_(w[:2])
    a.tensor().view(torch.float32).view(4, Kd, N)[2:].copy_(w[4:])
    b.tensor().view(torch.float32).view(2, Kd, N).copy_(w[2:4])
    comp = SimComposite([(a, 0, 2 * nb), (b, 0, 2 * nb), (a, 2 * nb, 2 * nb)])
    try:
        wc = comp.tensor().view(torch.float32).view(E, Kd, N)
        info = {}
        out = K.grouped_gemm(x, sizes, wc, info=info)
        assert info["method"] == "grouped_mm"
        assert rel_err(out, ref64(x, sizes, w)) < 1e-5
        # the same experts as pieces of the two buffers (the weight_segments form)
        segs = [(0, a.tensor(0, 2 * nb).view(torch.float32).view(2, Kd, N)),
                (2, b.tensor().view(torch.float32).view(2, Kd, N)),
                (4, a.tensor(2 * nb, 2 * nb).view(torch.float32).view(2, Kd, N))]
        assert rel_err(K.grouped_gemm(x, sizes, segs), ref64(x, sizes, w)) < 1e-5
        del wc, segs
    finally:
        comp.close()
        a.close(), b.close()


def test_offsets_and_token_groups_are_equivalent(seed):
    x, sizes, w = make_case(seed, 6, 16, 24, 45, torch.float32)
    ref = ref64(x, sizes, w)
    offs = np.cumsum(sizes)
    variants = [
        (sizes, {}), (np.asarray(sizes), {}), (torch.tensor(sizes), {}),
        (offs.tolist(), {"offsets": True}), (torch.tensor(offs, dtype=torch.int32), {"offsets": True}),
        (K.TokenGroups(sizes), {}), (K.TokenGroups(torch.tensor(offs), offsets=True), {}),
    ]
    for arg, kw in variants:
        assert rel_err(K.grouped_gemm(x, arg, w, **kw), ref) < 1e-5, (arg, kw)


def test_token_groups_cache_and_rows():
    g = K.TokenGroups([2, 0, 3])
    assert g.num_experts == 3 and g.num_tokens == 5
    assert g.rows(0, 1) == (0, 2) and g.rows(1, 2) == (2, 2) and g.rows(1, 3) == (2, 5)
    d = g.device_offsets("cpu")
    assert d.dtype == torch.int32 and d.tolist() == [2, 2, 5]
    assert g.device_offsets("cpu") is d


def test_host_forms_of_m_sizes(seed):
    """Every host-side form of the counts / offsets gives the same result, on one tensor and on pieces."""
    x, sizes, w = make_case(seed, 7, 16, 24, 53, torch.float32)
    ref = ref64(x, sizes, w)
    offs = np.cumsum(sizes)
    forms = [
        (sizes, {}), (tuple(sizes), {}), (np.asarray(sizes, dtype=np.int32), {}), ([np.int64(s) for s in sizes], {}),
        (torch.tensor(sizes, dtype=torch.int32), {}), (torch.tensor(sizes, dtype=torch.int64), {}),
        (offs.astype(np.int32), {"offsets": True}), (torch.tensor(offs, dtype=torch.int64), {"offsets": True}),
        (K.TokenGroups(torch.tensor(sizes), validate=False), {}),  # CPU tensor: validated anyway (free)
    ]
    for arg, kw in forms:
        for wf in (w, [(0, w[:2]), (2, w[2:3]), (3, w[3:])], [w[:4], w[4:]]):
            for backend in ("torch", "torch:segments", "torch:segments_async", "reference"):
                if isinstance(wf, torch.Tensor) and "segments" in backend:
                    continue
                got = K.grouped_gemm(x, arg, wf, backend=backend, **kw)
                assert rel_err(got, ref) < 1e-5, (type(arg), kw, backend)


def test_has_device_kernel_off_cuda():
    for dev in ("cpu", "meta"):
        for dt in (torch.float32, torch.bfloat16):
            assert capabilities.has_device_kernel(torch.device(dev), dt)


def test_first_device_probe_under_capture_is_refused(monkeypatch):
    """The capability probe waits on the host: its first run inside a CUDA graph capture would
    break the capture (and cache the capture's error as the answer). It is refused, and nothing
    is cached, so the eager warm-up afterwards still probes."""
    import dwdp_comm as dc
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    ran = []
    for ask in (lambda: capabilities.grouped_mm_unavailable_reason(torch.device("cuda", 7), torch.float16),
                lambda: capabilities.fp8_unavailable_reason(torch.device("cuda", 7))):
        with pytest.raises(dc.GraphCaptureError, match="once eagerly before capturing"):
            ran.append(ask())
    assert ran == []
    # off CUDA there is no capture to break: CPU answers as before
    assert capabilities.grouped_mm_unavailable_reason(torch.device("cpu"), torch.float32) is None


def test_token_groups_piece_offsets_are_relative_and_cached():
    g = K.TokenGroups([2, 0, 3, 4, 1])
    a, b, c = g.piece_offsets("cpu", ((0, 2), (2, 1), (3, 2)))
    assert a.tolist() == [2, 2] and b.tolist() == [3] and c.tolist() == [4, 5]
    assert all(t.dtype == torch.int32 and t.is_contiguous() for t in (a, b, c))
    assert g.piece_offsets("cpu", ((0, 2), (2, 1), (3, 2)))[2] is c  # cached: no new upload
    whole, = g.piece_offsets("cpu", ((0, 5),))
    assert whole is g.device_offsets("cpu") and whole.tolist() == [2, 2, 5, 9, 10]
    assert g.on_host and repr(g) == "TokenGroups(num_experts=5, num_tokens=10)"
    with pytest.raises(InvalidTypeError, match="validate"):
        K.TokenGroups([1, 2], validate="no")
    with pytest.raises(InvalidArgumentError, match="sum to 3"):
        K.TokenGroups([1, 2], num_tokens=4)


def test_repeated_calls_reuse_device_offsets(seed, monkeypatch):
    """With a TokenGroups reused, a call uploads nothing: the contiguous path is exactly one
    torch._grouped_mm on the cached offsets; split weights one per piece with tokens (relative
    offsets cached)."""
    x, sizes, w = make_case(seed, 8, 16, 32, 80, torch.bfloat16, empty_frac=0.0)
    g = K.TokenGroups(sizes)
    pieces = [(0, w[:2]), (2, w[2:4]), (4, w[4:6]), (6, w[6:])]
    for form in (w, pieces):  # warm the caches
        K.grouped_gemm(x, g, form)
    uploads, calls = [], []
    real_upload, real_mm = token_groups.upload_ints, torch._grouped_mm
    monkeypatch.setattr(token_groups, "upload_ints", lambda *a: uploads.append(a) or real_upload(*a))
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append((a, k)) or real_mm(*a, **k))
    out = K.grouped_gemm(x, g, w)
    assert len(calls) == 1 and calls[0][1]["offs"] is g.device_offsets("cpu") and calls[0][0][0] is x
    assert rel_err(out, ref64(x, sizes, w)) < 1e-2
    calls.clear()
    out = K.grouped_gemm(x, g, pieces)
    busy = sum(1 for f, t in pieces if sum(sizes[f:f + t.shape[0]]))  # random sizes may leave a piece empty
    assert len(calls) == busy and not uploads
    assert rel_err(out, ref64(x, sizes, w)) < 1e-2
    K.grouped_gemm(x, sizes, pieces)  # a fresh list: one upload (the relative offsets of the pieces)
    assert len(uploads) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segments_direct_matches_reference_at_every_threshold(seed, dtype):
    """segments_direct: every mix of direct experts and grouped runs gives the reference result,
    with and without out=, and nothing falls back (aligned shapes)."""
    rng = np.random.default_rng(seed)
    for _ in range(6):
        E, Kd, N = int(rng.integers(2, 12)), 8 * int(rng.integers(1, 5)), 8 * int(rng.integers(1, 5))
        x, sizes, w = make_case(int(rng.integers(2**31)), E, Kd, N, int(rng.integers(0, 120)), dtype)
        c = cuts(rng, E)
        pieces = [w[a:b] for a, b in zip(c[:-1], c[1:])]
        ref = ref64(x, sizes, w)
        for min_rows in (0, 1, 5, 20, 10**9):
            for out in (None, torch.full((x.shape[0], N), float("nan"), dtype=dtype)):
                info = {}
                got = K.grouped_gemm(x, sizes, pieces, out=out, backend="torch:segments_direct", info=info,
                                     direct_min_rows=min_rows)
                want = "empty" if not x.shape[0] else "grouped_mm" if len(pieces) == 1 else "segments_direct"
                assert info["method"] == want and "fallback" not in info, info
                assert out is None or got is out
                if x.shape[0]:
                    assert rel_err(got, ref) < TOL[dtype], (sizes, c, min_rows, out is None)


def test_segments_direct_writes_big_experts_straight_into_the_output(seed, monkeypatch):
    """Piece 0 first, on all of x (it allocates the output); then, in the other pieces, one
    torch.mm(out=rows of out) per expert with >= direct_min_rows rows, and one grouped call per
    run of smaller experts (a lone busy expert in a run: torch.mm too)."""
    x, _, w = make_case(seed, 10, 16, 16, 0, torch.float32)
    sizes = [4, 4, 9, 1, 2, 0, 8, 1, 0, 3]
    x = torch.randn(sum(sizes), 16)
    grouped, mms = [], []
    real_gmm, real_mm = torch._grouped_mm, torch.mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda a, b, **k: grouped.append((a.shape[0], b.shape[0])) or
                        real_gmm(a, b, **k))
    monkeypatch.setattr(torch, "mm", lambda a, b, out=None: mms.append((a.shape[0], out is not None)) or
                        real_mm(a, b, out=out))
    out = K.grouped_gemm(x, sizes, [w[:2], w[2:]], backend="torch:segments_direct", direct_min_rows=5)
    # piece 0 (experts 0-1) on all 32 rows; piece 1: e2 direct (9), run e3-e5 (1+2+0 rows, grouped),
    # e6 direct (8), run e7-e9 (1+0+3: two busy experts, grouped)
    assert grouped == [(32, 2), (3, 3), (4, 3)], grouped
    assert mms == [(9, True), (8, True)], mms
    assert rel_err(out, ref64(x, sizes, w)) < 1e-5


def test_split_piece_units_cover_exactly_the_busy_rows(seed):
    """split_piece: units in row order, disjoint, covering every row of the piece; "mm" units
    hold one expert with rows, at least min_rows of them unless alone in a run."""
    rng = np.random.default_rng(seed)
    for _ in range(200):
        E = int(rng.integers(1, 20))
        sizes = rng.integers(0, 12, E) * (rng.random(E) > 0.3)
        g = K.TokenGroups(sizes.tolist())
        first = int(rng.integers(0, E))
        n = int(rng.integers(1, E - first + 1))
        w = torch.zeros(n, 1, 1)
        min_rows = int(rng.integers(0, 10))
        units = segments.split_piece(g, first, w, min_rows)
        r0, r1 = g.rows(first, first + n)
        covered = [(u[-2], u[-1]) for u in units]
        busy = [(int(g.starts[e]), int(g.ends[e])) for e in range(first, first + n) if sizes[e]]
        assert covered == sorted(covered) and all(a < b for a, b in covered)
        assert sum(b - a for a, b in covered) == r1 - r0
        assert all(covered[i][1] <= covered[i + 1][0] for i in range(len(covered) - 1))
        for u in units:
            if u[0] == "mm":
                assert (u[3], u[4]) in busy
            else:
                _, f, cnt, wv, a, b = u
                assert wv.shape[0] == cnt and (a, b) == g.rows(f, f + cnt)
                assert sum(1 for e in range(f, f + cnt) if sizes[e]) >= 2
                assert all(sizes[e] < max(min_rows, 1) for e in range(f, f + cnt))


def test_chunks_are_contiguous_and_balanced(seed):
    """balanced_chunks: the units in order, in at most n chunks, none empty, no chunk past its share by
    more than its last unit."""
    rng = np.random.default_rng(seed)
    for _ in range(300):
        rows = rng.integers(1, 50, int(rng.integers(0, 30)))
        ends = np.cumsum(rows)
        units = [("mm", i, None, int(e - r), int(e)) for i, (r, e) in enumerate(zip(rows, ends))]
        n = int(rng.integers(1, 6))
        chunks = segments.balanced_chunks(units, n)
        assert [u for c in chunks for u in c] == units
        assert len(chunks) <= max(n, 0) and all(chunks)
        total = int(rows.sum())
        for c in chunks[:-1]:
            assert sum(u[4] - u[3] for u in c[:-1]) < total / n or len(c) == 1


def test_split_runs_the_first_piece_last_and_in_place(seed, monkeypatch):
    """The first piece's call creates the output (whole x, its own groups); it runs after the
    other pieces, and single-expert pieces are written in place with torch.mm(out=)."""
    x, sizes, w = make_case(seed, 9, 16, 16, 90, torch.float32, empty_frac=0.0)
    sizes = [10] * 9
    calls = []
    real_mm = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda a, b, **k: calls.append((a.shape[0], b.shape[0])) or
                        real_mm(a, b, **k))
    pieces = [(0, w[:3]), (3, w[3:4]), (4, w[4:7]), (7, w[7:])]
    out = K.grouped_gemm(x, sizes, pieces, backend="torch:segments")
    assert calls == [(30, 3), (20, 2), (90, 3)]  # piece 2, piece 3, then piece 0 on all of x
    assert rel_err(out, ref64(x, sizes, w)) < 1e-5
    for s in ([0, 0, 0, 30, 20, 10, 10, 10, 10], [5, 0, 0, 0, 0, 0, 0, 0, 85], [90] + [0] * 8):
        calls.clear()
        got = K.grouped_gemm(x, s, pieces, backend="torch:segments_async")
        assert rel_err(got, ref64(x, s, w)) < 1e-5, s
        assert all(rows > 0 for rows, _ in calls), calls  # no GEMM on pieces without tokens


@pytest.mark.parametrize("method", ["auto", "segments", "segments_async", "segments_direct", "grouped_mm"])
def test_out_is_written_in_place(seed, method):
    """out= receives every row, including a row-slice view of a larger buffer whose other rows stay intact."""
    x, sizes, w = make_case(seed, 6, 16, 24, 57, torch.float32)
    min_rows = 10  # segments_direct: some experts direct, some grouped
    ref = ref64(x, sizes, w)
    forms = [w] if method == "grouped_mm" else [w, [(0, w[:1]), (1, w[1:4]), (4, w[4:])], [w[:3], w[3:]]]
    for form in forms:
        buf = torch.full((57 + 6, 24), float("nan"))
        out = buf[3:60]
        got = K.grouped_gemm(x, sizes, form, out=out, backend=f"torch:{method}" if method != "auto" else "torch",
                             direct_min_rows=min_rows)
        assert got is out and got.data_ptr() == buf[3].data_ptr()
        assert rel_err(buf[3:60], ref) < 1e-5
        assert torch.isnan(buf[:3]).all() and torch.isnan(buf[60:]).all()


def test_meta_device_fast_paths_never_read_device_data(seed):
    """On the meta device any host read of tensor data raises: the torch paths (one tensor or
    pieces, TokenGroups from host counts, device counts with validate=False) read none, so they
    cannot synchronise. Split weights with validate=False device counts need the row ranges on
    the host: that (documented) fetch is the only read, and raises here."""
    E, Kd, N, T = 8, 32, 48, 64
    x = torch.empty(T, Kd, dtype=torch.bfloat16, device="meta")
    w = torch.empty(E, Kd, N, dtype=torch.bfloat16, device="meta")
    pieces = [(0, w[:2]), (2, w[2:3]), (3, w[3:6]), (6, w[6:])]
    sizes = [8] * E
    counts = torch.empty(E, dtype=torch.int64, device="meta")
    for arg, form in ((sizes, w), (K.TokenGroups(sizes), pieces), (sizes, pieces),
                      (K.TokenGroups(counts, validate=False), w),
                      (K.TokenGroups(counts.to(torch.int32), offsets=True, validate=False), w)):
        for backend in ("torch", "torch:segments", "torch:segments_async", "torch:segments_direct"):
            if isinstance(form, torch.Tensor) and backend != "torch":
                continue
            info = {}
            out = K.grouped_gemm(x, arg, form, backend=backend, info=info)
            assert out.shape == (T, N) and out.device.type == "meta"
            assert info["method"] in ("grouped_mm", "segments", "segments_async", "segments_direct"), info
    lazy = K.TokenGroups(counts, validate=False)
    K.grouped_gemm(x, lazy, w)
    assert not lazy.on_host and "not validated" in repr(lazy)
    with pytest.raises(Exception, match="meta"):
        K.grouped_gemm(x, lazy, pieces)
    with pytest.raises(InvalidArgumentError, match="7 entries"):
        K.grouped_gemm(x, K.TokenGroups(counts[:7], validate=False), w)


def test_choose_method_names_what_runs(seed):
    """torch_path.choose_method(p, m) is exactly what run() reports as info["method"] (or raises the
    same error class), for every method, dtype, weights form and a strided x."""
    rng = np.random.default_rng(seed)
    for dtype in (torch.float32, torch.bfloat16):
        x, sizes, w = make_case(int(rng.integers(2**31)), 6, 16, 24, 70, dtype)
        forms = [w, [w[:2], w[2:]], [(0, w[:1]), (1, w[1:4]), (4, w[4:])], w.transpose(-1, -2).contiguous()
                 .transpose(-1, -2)]
        for xx, form in [(x, f) for f in forms] + [(x[:, ::2].repeat(1, 2), [w[:3], w[3:]]), (x[:0], w)]:
            sz = sizes if xx.shape[0] else [0] * 6
            for m in torch_path.METHODS:
                backend = "torch" if m == "auto" else f"torch:{m}"
                try:
                    want = torch_path.choose_method(K.make_problem(xx, sz, form), m)
                except (InvalidArgumentError, BackendUnavailableError) as exc:
                    with pytest.raises(type(exc)):
                        K.grouped_gemm(xx, sz, form, backend=backend)
                    continue
                info = {}
                out = K.grouped_gemm(xx, sz, form, backend=backend, info=info)
                assert info["method"] == want, (m, want, info)
                if xx.shape[0]:
                    assert rel_err(out, ref64(xx, sz, w)) < TOL[dtype], (m, info)


def test_split_strategy_table():
    """How split weights run: direct (auto on CUDA, segments_direct), async (fp8, segments_async),
    serial (CPU auto, segments); an unknown method names the argument."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    table = {("auto", cpu, False): "serial", ("auto", cuda, False): "direct", ("auto", cuda, True): "async",
             ("segments", cuda, False): "serial", ("segments_async", cpu, False): "async",
             ("segments_direct", cpu, False): "direct", ("segments_direct", cuda, True): "async",
             ("grouped_mm", cuda, False): "serial", ("per_expert", cuda, False): "serial"}
    for (m, dev, fp8), want in table.items():
        assert torch_path.split_strategy(m, dev, fp8=fp8) == want, (m, dev, fp8)
    assert set(table.values()) == set(torch_path.SPLIT_STRATEGIES)
    with pytest.raises(InvalidArgumentError, match="method"):
        torch_path.split_strategy("direct", cpu)


def test_direct_min_rows_is_checked_and_only_an_argument(seed):
    """A bad direct_min_rows names the argument (grouped_gemm, moe_mlp, on any backend); its
    default is documented."""
    x, sizes, w = make_case(seed, 4, 16, 16, 40, torch.float32)
    # out of range: InvalidArgumentError; not an int: InvalidTypeError (dwdp_comm.checks.check_int's one rule)
    for bad, err in ((-1, InvalidArgumentError), (1.5, InvalidTypeError), (True, InvalidTypeError),
                     ("8", InvalidTypeError), (None, InvalidTypeError)):
        with pytest.raises(err, match="direct_min_rows"):
            K.grouped_gemm(x, sizes, [w[:2], w[2:]], direct_min_rows=bad)
        with pytest.raises(err, match="direct_min_rows"):
            K.grouped_gemm(x, sizes, w, backend="reference", direct_min_rows=bad)
        with pytest.raises(err, match="direct_min_rows"):
            K.moe_mlp(x, sizes, torch.randn(4, 16, 8), torch.randn(4, 4, 16), direct_min_rows=bad)
    assert "direct_min_rows" in K.grouped_gemm.__doc__ and torch_path.DIRECT_MIN_ROWS == 128


def test_bench_smoke_runs_end_to_end(tmp_path):
    """perf/bench_grouped_gemm.py --smoke on CPU: every section, the checks, the JSON and the table."""
    path = tmp_path / "gg.json"
    r = subprocess.run([sys.executable, os.path.join(REPO, "perf", "bench_grouped_gemm.py"), "--smoke",
                        "--no-numba", "--reps", "3", "--json", str(path)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = __import__("json").loads(path.read_text())
    assert d["env"]["git"]["commit"] and d["env"]["date"] and d["env"]["host"]
    variants = {x["variant"] for x in d["results"]}
    assert {"raw_grouped_mm", "raw_grouped_mm_again", "contiguous", "split", "split_serial"} <= variants
    assert all(c["ok"] for c in d["checks"]) and d["checks"]
    assert d["ratios"]["split / raw_grouped_mm"]["target"] == 0.97
    assert set(d["ratios"]["split / raw_grouped_mm"]["noise_floor"]) == set(d["ratios"]["split / raw_grouped_mm"]["values"])
    assert all(x["rounds"] == 3 and len(x["ms_rounds"]) == 3 for x in d["results"])
    assert d["host"] and all(h["host_us"] > 0 for h in d["host"])
    assert {"moe_contiguous", "moe_split", "moe_split_serial"} <= {x["variant"] for x in d["results"]
                                                                   if x["section"] == "moe"}
    assert "moe_split / moe_contiguous" in d["ratios"]
    assert "# ratios vs raw_grouped_mm" in r.stdout and "target" in r.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_out_argument(seed, dtype):
    x, sizes, w = make_case(seed, 5, 32, 16, 30, dtype)
    for backend in ("torch", "reference"):
        for form in (w, [w[:2], w[2:]]):
            out = torch.full((30, 16), float("nan"), dtype=dtype)
            got = K.grouped_gemm(x, sizes, form, out=out, backend=backend)
            assert got is out
            assert rel_err(out, ref64(x, sizes, w)) < TOL[dtype]


def test_rows_past_the_first_piece_are_overwritten(seed):
    """The segments method lets the first piece's call allocate [T, N]: every row must be ours."""
    for _ in range(5):
        x, sizes, w = make_case(seed, 8, 16, 16, 64, torch.float32, empty_frac=0.5)
        seed += 1
        out = K.grouped_gemm(x, sizes, [(0, w[:3]), (3, w[3:5]), (5, w[5:])], backend="torch:segments")
        assert rel_err(out, ref64(x, sizes, w)) < 1e-5


def test_nan_in_one_expert_stays_in_its_rows(seed):
    x, sizes, w = make_case(seed, 4, 16, 8, 40, torch.float32, empty_frac=0.0)
    sizes = [10, 10, 10, 10]
    w = w.clone()
    w[2, 3, 5] = float("nan")
    for backend in ("torch", "reference"):
        out = K.grouped_gemm(x, sizes, [w[:2], w[2:]], backend=backend)
        assert torch.isnan(out[20:30, 5]).all()
        assert torch.isfinite(out[:20]).all() and torch.isfinite(out[30:]).all()
        assert rel_err(out, ref64(x, sizes, w)) == math.inf  # NaN never passes a check


def _property(E, Kd, N, T, bf16, seed, form):
    dtype = torch.bfloat16 if bf16 else torch.float32
    x, sizes, w = make_case(seed, E, Kd, N, T, dtype)
    out = K.grouped_gemm(x, sizes, split_forms(w, seed)[form])
    assert out.shape == (T, N)
    if T and Kd:
        ref = ref64(x, sizes, w)
        if ref.norm() > 0:
            assert rel_err(out, ref) < TOL[dtype]


if given is not None:
    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(E=st.integers(1, 7), Kd=st.integers(1, 40), N=st.integers(1, 40), T=st.integers(0, 60),
           bf16=st.booleans(), seed=st.integers(0, 2**31 - 1), form=st.sampled_from(
               ["tensor", "segments", "per_owner", "per_expert", "mixed_2d_3d", "separate_allocs"]))
    def test_property_torch_matches_reference(E, Kd, N, T, bf16, seed, form):
        _property(E, Kd, N, T, bf16, seed, form)
else:
    def test_property_torch_matches_reference():
        pytest.skip("hypothesis is not installed")


# ---- MoE MLP -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H, I", [(32, 24), (30, 13)], ids=["aligned", "odd"])
def test_moe_mlp_matches_composition(seed, dtype, H, I):
    E, T = 6, 50
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    w13 = (torch.randn(E, H, 2 * I, generator=g) / math.sqrt(H)).to(dtype)
    w2 = (torch.randn(E, I, H, generator=g) / math.sqrt(I)).to(dtype)
    sizes = random_sizes(np.random.default_rng(seed), E, T)
    # float64 oracle of the whole MLP
    h = ref64(x, sizes, w13)
    a = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
    want = ref64(a.to(dtype), sizes, w2) if dtype == torch.bfloat16 else \
        reference.run(K.make_problem(a.float(), sizes, w2.float()), out_dtype=torch.float64)
    info = {}
    got = K.moe_mlp(x, sizes, [(0, w13[:2]), (2, w13[2:])], [w2[:4], w2[4:]], info=info)
    assert got.shape == (T, H) and got.dtype == dtype
    assert info["gate_up"]["method"] == ("grouped_mm_rows" if H == 32 else "per_expert_rows")
    assert info["down"]["backend"] == "torch"
    assert rel_err(got, want) < (2e-2 if dtype == torch.bfloat16 else 1e-5)
    ref_backend = K.moe_mlp(x, sizes, w13, w2, backend="reference")
    assert rel_err(got, ref_backend) < (2e-2 if dtype == torch.bfloat16 else 1e-5)


def test_moe_mlp_fp8_falls_back_to_reference_on_cpu(seed):
    E, H, I, T = 4, 32, 16, 40
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).bfloat16()
    sizes = random_sizes(np.random.default_rng(seed), E, T)

    def q(w):  # [E, K, N] real -> fp8 [E, K, N] K-contiguous, scales [E, N]
        s = w.abs().amax(dim=1) / reference.FP8_MAX
        return (w / s[:, None, :]).transpose(1, 2).contiguous().to(torch.float8_e4m3fn).transpose(1, 2), s

    w13 = torch.randn(E, H, 2 * I, generator=g) / math.sqrt(H)
    w2 = torch.randn(E, I, H, generator=g) / math.sqrt(I)
    (q13, s13), (q2, s2) = q(w13), q(w2)
    info = {}
    got = K.moe_mlp(x, sizes, [q13[:1], q13[1:]], q2, w13_scales=[s13[:1], s13[1:]], w2_scales=s2, info=info)
    assert info["gate_up"]["backend"] == "reference" and info["down"]["backend"] == "reference"
    want = K.moe_mlp(x, sizes, w13.bfloat16(), w2.bfloat16(), backend="reference")
    assert rel_err(got, want) < 0.1


def test_swiglu():
    h = torch.randn(5, 8)
    want = torch.nn.functional.silu(h[:, :4]) * h[:, 4:]
    assert torch.allclose(K.swiglu(h), want, atol=1e-6)
    with pytest.raises(InvalidArgumentError, match="h"):
        K.swiglu(torch.randn(5, 7))


# ---- fp8 -----------------------------------------------------------------------------------------
def fp8_case(seed, E=4, Kd=32, N=16, T=30):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, Kd, generator=g).to(torch.bfloat16)
    w_real = torch.randn(E, N, Kd, generator=g) / math.sqrt(Kd)
    scales = w_real.abs().amax(dim=2) / reference.FP8_MAX  # [E, N] per output channel
    wq = (w_real / scales[:, :, None]).to(torch.float8_e4m3fn).transpose(1, 2)  # [E, K, N], K-contiguous
    sizes = random_sizes(np.random.default_rng(seed), E, T)
    return x, sizes, wq, scales.float(), w_real.transpose(1, 2)


def test_fp8_reference_is_close_to_real_weights(seed):
    x, sizes, wq, scales, w_real = fp8_case(seed)
    info = {}
    out = K.grouped_gemm(x, sizes, wq, weight_scales=scales, info=info)
    if capabilities.fp8_unavailable_reason(x.device):
        assert info["backend"] == "reference" and "fallback" in info
    assert out.dtype == torch.bfloat16
    real = ref64(x.float(), sizes, w_real.float().contiguous())
    assert rel_err(out, real) < 0.08  # e4m3 has 3 mantissa bits on both operands
    # split weights with scales split the same way, or differently
    for scl in ([scales[:1], scales[1:]], [(0, scales[:3]), (3, scales[3:])], list(scales)):
        got = K.grouped_gemm(x, sizes, [wq[:1], wq[1:]], weight_scales=scl, backend="reference")
        assert rel_err(got, out) < 1e-2


def test_fp8_prequantized_x(seed):
    x, sizes, wq, scales, _ = fp8_case(seed)
    xq, xs = K.quantize_rowwise(x)
    want = K.grouped_gemm(x, sizes, wq, weight_scales=scales, backend="reference")
    got = K.grouped_gemm(xq, sizes, [wq[:2], wq[2:]], weight_scales=scales, x_scales=xs, backend="reference")
    assert got.dtype == torch.bfloat16 and rel_err(got, want) == 0.0
    with pytest.raises(InvalidArgumentError, match="x_scales"):
        K.grouped_gemm(xq, sizes, wq, weight_scales=scales)
    with pytest.raises(InvalidArgumentError, match="x_scales"):
        K.grouped_gemm(xq, sizes, wq, weight_scales=scales, x_scales=xs[:-1])
    with pytest.raises(InvalidArgumentError, match="x_scales"):
        K.grouped_gemm(x, sizes, wq, weight_scales=scales, x_scales=xs)
    with pytest.raises(InvalidArgumentError, match="fp8 x needs fp8 weights"):
        K.grouped_gemm(xq, sizes, torch.randn(4, 32, 16), x_scales=xs)
    with pytest.raises(InvalidArgumentError, match=r"out: .*bfloat16"):
        K.grouped_gemm(x, sizes, wq, weight_scales=scales, out=torch.empty(x.shape[0], 16))


def test_fp8_torch_backend_reports_unavailable_on_cpu(seed):
    x, sizes, wq, scales, _ = fp8_case(seed)
    why = capabilities.fp8_unavailable_reason("cpu")
    assert why and "_scaled_grouped_mm" in why
    with pytest.raises(BackendUnavailableError, match="fp8"):
        K.grouped_gemm(x, sizes, wq, weight_scales=scales, backend="torch")
    assert K.available_backends("cpu", reasons=True)["torch-fp8"] == why


def test_fp8_argument_errors(seed):
    x, sizes, wq, scales, _ = fp8_case(seed)
    with pytest.raises(InvalidArgumentError, match="weight_scales"):
        K.grouped_gemm(x, sizes, wq, backend="reference")
    with pytest.raises(InvalidArgumentError, match="weight_scales"):
        K.grouped_gemm(x, sizes, wq, weight_scales=scales[:, :5], backend="reference")
    with pytest.raises(InvalidArgumentError, match="weight_scales"):
        K.grouped_gemm(x, sizes, wq, weight_scales=scales.double(), backend="reference")
    with pytest.raises(InvalidArgumentError, match="x"):
        K.grouped_gemm(x.float(), sizes, wq, weight_scales=scales, backend="reference")
    w = torch.randn(4, 32, 16)
    with pytest.raises(InvalidArgumentError, match="weight_scales"):
        K.grouped_gemm(x.float(), sizes, w, weight_scales=scales)


def test_quantize_rowwise():
    x = torch.randn(6, 20) * torch.arange(1, 7)[:, None]
    x[3] = 0
    q, s = K.quantize_rowwise(x)
    qb, sb = K.quantize_rowwise(x.bfloat16())
    assert sb.dtype == torch.float32 and rel_err(qb.float() * sb[:, None], x) < 0.06
    assert q.dtype == torch.float8_e4m3fn and s.shape == (6,) and s[3] == 1
    assert (q.float().abs().amax(dim=1)[[0, 1, 2, 4, 5]] == reference.FP8_MAX).all()
    assert rel_err(q.float() * s[:, None], x) < 0.05


# ---- validation ----------------------------------------------------------------------------------
def _ok():
    return torch.randn(10, 16), [4, 0, 6], torch.randn(3, 16, 8)


@pytest.mark.parametrize("case, exc, match", [
    (lambda x, m, w: (x[0], m, w), InvalidArgumentError, r"x: got 'shape \(16,\)'"),
    (lambda x, m, w: (x[:, :15], m, w), InvalidArgumentError, r"x: .*K=16"),
    (lambda x, m, w: (x.double(), m, w), InvalidArgumentError, r"x: got 'dtype torch.float64'"),
    (lambda x, m, w: (x.bfloat16(), m, w), InvalidArgumentError, r"x: .*weights' dtype torch.float32"),
    (lambda x, m, w: (x, [4, 6], w), InvalidArgumentError, r"m_sizes_or_offsets: got '2 entries'.*3"),
    (lambda x, m, w: (x, [4, 0, 5], w), InvalidArgumentError, r"sum to 9.*10 rows"),
    (lambda x, m, w: (x, [4, -1, 7], w), InvalidArgumentError, r"m_sizes\[1\]=-1"),
    (lambda x, m, w: (x, [4, 4, 10], w), InvalidArgumentError, r"offsets=True"),
    (lambda x, m, w: (x, [4.0, 0, 6], w), InvalidTypeError,
     r"m_sizes_or_offsets: got an object of type float, expected an int"),
    (lambda x, m, w: (x, torch.tensor([4.0, 0, 6]), w), InvalidArgumentError, r"integer tensor"),
    (lambda x, m, w: (x, "4,0,6", w), InvalidTypeError, r"m_sizes_or_offsets"),
    (lambda x, m, w: (x, m, w[:, :, :1].squeeze(2)), InvalidArgumentError, r"weights: .*3-D"),
    (lambda x, m, w: (x, m, w.to("meta")), InvalidArgumentError, r"on meta.*x's device cpu"),
    (lambda x, m, w: (x, m, [w[:1], w[1:].to("meta")]), InvalidArgumentError, r"experts 1\.\.2.*meta"),
    (lambda x, m, w: (x, m, [w[:1], w[1:].double()]), InvalidArgumentError, r"dtype torch.float64"),
    (lambda x, m, w: (x, m, [w[:1], torch.randn(2, 16, 9)]), InvalidArgumentError, r"\[K, N\] = \[16, 9\]"),
    (lambda x, m, w: (x, m, [(0, w[:1]), (2, w[1:])]), InvalidArgumentError, r"weights\[1\]\[0\]: got 2.*1"),
    (lambda x, m, w: (x, m, [(0, w[:1]), w[1:]]), InvalidArgumentError, r"a mix"),
    (lambda x, m, w: (x, m, []), InvalidArgumentError, r"empty list"),
    (lambda x, m, w: (x, m, [w[:1], "w"]), InvalidTypeError, r"weights\[1\]"),
    (lambda x, m, w: (x, m, [w[:1], w[1:]] + [w[:0]] + [w[:1]]), InvalidArgumentError, r"3 entries.*4"),
    (lambda x, m, w: (x, m, w[:0]), InvalidArgumentError, r"0 experts"),
])
def test_bad_input_gives_clear_error(case, exc, match):
    x, m, w = case(*_ok())
    with pytest.raises(exc, match=match):
        K.grouped_gemm(x, m, w)


def test_bad_offsets_and_out():
    x, m, w = _ok()
    with pytest.raises(InvalidArgumentError, match=r"non-decreasing"):
        K.grouped_gemm(x, [4, 3, 10], w, offsets=True)
    with pytest.raises(InvalidArgumentError, match=r"offsets end at 9"):
        K.grouped_gemm(x, [4, 4, 9], w, offsets=True)
    with pytest.raises(InvalidArgumentError, match=r"without the leading 0"):
        K.grouped_gemm(x, [0, 4, 4, 10], w, offsets=True)
    with pytest.raises(InvalidTypeError, match="offsets"):
        K.grouped_gemm(x, m, w, offsets=1)
    with pytest.raises(InvalidArgumentError, match=r"out: .*\(10, 8\)"):
        K.grouped_gemm(x, m, w, out=torch.empty(10, 9))
    with pytest.raises(InvalidArgumentError, match=r"out: .*torch.float32"):
        K.grouped_gemm(x, m, w, out=torch.empty(10, 8, dtype=torch.bfloat16))
    with pytest.raises(InvalidArgumentError, match=r"out: .*contiguous"):
        K.grouped_gemm(x, m, w, out=torch.empty(8, 10).t())
    with pytest.raises(InvalidArgumentError, match="backend"):
        K.grouped_gemm(x, m, w, backend="cutlass")
    with pytest.raises(InvalidArgumentError, match="method"):
        K.grouped_gemm(x, m, w, backend="torch:magic")
    with pytest.raises(InvalidArgumentError, match="backend"):
        K.grouped_gemm(x, m, w, backend="reference:fast")
    with pytest.raises(InvalidTypeError, match="info"):
        K.grouped_gemm(x, m, w, info=[])


def test_numba_backend_errors_clearly_without_gpu_or_simulator():
    """In this process the simulator is off: CPU tensors must be refused with a reason."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        pytest.skip("simulator enabled in this process")
    x, m, w = _ok()
    with pytest.raises(BackendUnavailableError, match="numba"):
        K.grouped_gemm(x, m, w, backend="numba")
    with pytest.raises(InvalidArgumentError, match="config"):
        from dwdp_comm.kernels import numba_grouped
        numba_grouped.run(K.make_problem(x, m, w), config="3x3x3")


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("config", ["128x128x8", "64x128x8", "64x64x16", "8x8x4"])
def test_numba_gpu_kernel_compiles_to_ptx(config, bf16):
    """The GPU variant of the kernel (pointer intrinsics) types, lowers, and keeps its tiles in
    registers. Needs no GPU, only NVVM (skips where numba-cuda has no compiler toolchain)."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        pytest.skip("simulator enabled in this process")
    pytest.importorskip("numba")
    from numba import types
    from numba.core.errors import LoweringError, TypingError
    from dwdp_comm.kernels import numba_grouped as ng
    cuda = ng.numba_cuda()
    kern = ng.build_kernel(ng.CONFIGS[config], bf16, bf16)
    i64, arr = types.int64, types.Array
    sig = (i64, i64, i64, arr(i64, 1, "C"), arr(i64, 1, "C"), arr(i64, 1, "C"), arr(types.int32, 1, "C"),
           arr(i64, 1, "C"), arr(i64, 1, "C"), i64, arr(types.float32, 2, "C"), i64, i64)
    try:
        ptx, _ = cuda.compile_ptx(kern.py_func, sig, cc=(9, 0))
    except (TypingError, LoweringError):
        raise
    except Exception as exc:  # no NVVM / NVRTC here
        pytest.skip(f"numba-cuda cannot compile here: {type(exc).__name__}: {str(exc)[:200]}")
    assert "fma.rn.f32" in ptx and "ld.global" in ptx and "bar.sync" in ptx
    assert "ld.local" not in ptx and "st.local" not in ptx  # accumulators stayed in registers


def test_available_backends():
    names = K.available_backends("cpu")
    assert names[:2] == ["reference", "torch"]
    status = K.available_backends("cpu", reasons=True)
    assert set(status) == {"reference", "torch", "torch-fp8", "numba"}
    assert status["reference"] is None and status["torch"] is None


def _run_py(code: str, **env) -> subprocess.CompletedProcess:
    e = {**os.environ, **env, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=120)


def test_import_does_not_import_numba():
    r = _run_py("import sys, dwdp_comm, dwdp_comm.kernels as K, dwdp_comm.kernels.torch_path, "
                "dwdp_comm.kernels.reference\n"
                "assert 'numba' not in sys.modules, sorted(m for m in sys.modules if 'numba' in m)\nprint('ok')")
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_works_without_numba_installed():
    code = ("import sys; sys.modules['numba'] = None  # as if numba were not installed\n"
            "import torch, dwdp_comm.kernels as K\n"
            "from dwdp_comm.errors import BackendUnavailableError\n"
            "x, w = torch.randn(5, 16), torch.randn(2, 16, 8)\n"
            "assert K.grouped_gemm(x, [2, 3], w).shape == (5, 8)\n"
            "why = K.available_backends(reasons=True)['numba']\n"
            "assert 'not installed' in why, why\n"
            "try:\n    K.grouped_gemm(x, [2, 3], w, backend='numba')\n"
            "except BackendUnavailableError as exc:\n"
            "    assert 'not installed' in str(exc), exc\n"
            "print('ok')")
    r = _run_py(code)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_split_runs_on_the_current_stream_off_cuda(seed):
    """Worker streams are a CUDA matter: on CPU every piece runs in order, and info says so."""
    x, sizes, w = make_case(seed, 9, 16, 24, 120, torch.float32)
    info = {}
    out = K.grouped_gemm(x, sizes, [w[:3], w[3:5], w[5:]], backend="torch:segments_async", info=info)
    assert info["streams"] == 0 and info["method"] == "segments_async"
    assert rel_err(out, ref64(x, sizes, w)) < TOL[torch.float32]
    mi = {}
    w13, w2 = torch.randn(9, 16, 8), torch.randn(9, 4, 16)
    got = K.moe_mlp(x, sizes, [w13[:4], w13[4:]], [w2[:4], w2[4:]], info=mi)
    assert mi["gate_up"]["streams"] == 0 and mi["down"]["streams"] == 0, mi
    assert rel_err(got, K.moe_mlp(x, sizes, w13, w2, backend="reference")) < 1e-4

"""The Numba CUDA grouped GEMM in the CUDA simulator, on CPU, against the float64 reference.

``NUMBA_ENABLE_CUDASIM=1`` must be set before numba is first imported, so the kernel runs in a
spawned child (this file run as a script): the rest of the test session keeps the real
numba.cuda (or none). The child runs every case once and prints a JSON report; each pytest test
below checks one case of it. Skips cleanly when numba / numba-cuda are not installed.

Run the child by hand, from the repository root: ``NUMBA_ENABLE_CUDASIM=1 python -m
tests.cpu.test_kernels_numba_sim [seed]`` (the parent runs it with the root on ``PYTHONPATH``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
MARK = "@@SIM-REPORT@@"

# name: (dtype, (E, K, N, T), weights form, tile config, weight layout)
CASES = {
    "fp32_odd_tensor": ("float32", (3, 13, 11, 17), "tensor", "8x8x4", "kn"),
    "bf16_odd_tensor": ("bfloat16", (3, 13, 11, 17), "tensor", "8x8x4", "kn"),
    "fp32_per_owner": ("float32", (6, 12, 18, 21), "per_owner", "16x16x4", "kn"),
    "bf16_segments_transposed": ("bfloat16", (5, 11, 13, 17), "segments", "8x8x4", "nk"),
    "fp32_per_expert": ("float32", (4, 12, 10, 20), "per_expert", "8x8x4", "kn"),
    "bf16_separate_allocs": ("bfloat16", (4, 12, 10, 20), "separate_allocs", "8x8x4", "kn"),
    "fp32_single_expert": ("float32", (1, 9, 7, 13), "tensor", "8x8x4", "kn"),
    "fp32_default_config": ("float32", (3, 20, 12, 14), "tensor", "128x128x8", "kn"),
    "bf16_64x128x8_mixed": ("bfloat16", (2, 16, 20, 10), "mixed_2d_3d", "64x128x8", "kn"),
    "fp32_64x64x16_dwdp_pieces": ("float32", (3, 33, 17, 20), "dwdp_3_pieces", "64x64x16", "nk"),
}
EXTRA = ["one_expert_has_all_tokens", "no_tokens", "out_argument", "nan_stays_in_its_rows",
         "several_launches", "moe_mlp", "fp8_refused", "non_cpu_refused", "available_backends"]


# ---- child ---------------------------------------------------------------------------------------
def _child(seed: int) -> dict:
    import torch

    import dwdp_comm.kernels as K
    from dwdp_comm.errors import BackendUnavailableError
    from dwdp_comm.kernels import numba_grouped
    from tests.helpers.kernel_cases import TOL, make_case, ref64, rel_err, split_forms

    report: dict = {}

    def record(name, fn):
        try:
            report[name] = fn()
        except Exception as exc:  # reported to the parent, which fails that test
            report[name] = {"raised": f"{type(exc).__name__}: {exc}"}

    def case(dtype_name, shape, form, config, layout, s):
        dtype = getattr(torch, dtype_name)
        E, Kd, N, T = shape
        x, sizes, w = make_case(s, E, Kd, N, T, dtype, layout=layout)
        info = {}
        out = K.grouped_gemm(x, sizes, split_forms(w, s)[form], backend=f"numba:{config}", info=info)
        assert info["method"] == "numba-sim", info
        return {"err": rel_err(out, ref64(x, sizes, w)), "tol": TOL[dtype], "info": info}

    for i, (name, spec) in enumerate(CASES.items()):
        record(name, lambda spec=spec, i=i: case(*spec, seed + i))

    def one_expert_has_all_tokens():
        x, _, w = make_case(seed, 5, 16, 16, 11, torch.bfloat16)
        sizes = [0, 0, 11, 0, 0]
        out = K.grouped_gemm(x, sizes, [w[:3], w[3:]], backend="numba:8x8x4")
        return {"err": rel_err(out, ref64(x, sizes, w)), "tol": 1e-2}

    def no_tokens():
        x, sizes, w = make_case(seed, 3, 8, 8, 0, torch.float32)
        out = K.grouped_gemm(x, sizes, w, backend="numba")
        assert out.shape == (0, 8)
        return {"err": 0.0, "tol": 1.0}

    def out_argument():
        errs = []
        for dtype in (torch.float32, torch.bfloat16):
            x, sizes, w = make_case(seed, 3, 10, 9, 12, dtype)
            out = torch.full((12, 9), float("nan"), dtype=dtype)
            got = K.grouped_gemm(x, sizes, w, out=out, backend="numba:8x8x4")
            assert got is out
            errs.append(rel_err(out, ref64(x, sizes, w)) / TOL[dtype])
        return {"err": max(errs), "tol": 1.0}

    def nan_stays_in_its_rows():
        x, _, w = make_case(seed, 3, 8, 8, 12, torch.float32)
        sizes = [4, 4, 4]
        w = w.clone()
        w[1, 2, 3] = float("nan")
        out = K.grouped_gemm(x, sizes, w, backend="numba:8x8x4")
        ok = bool(torch.isnan(out[4:8, 3]).all() and torch.isfinite(out[:4]).all() and torch.isfinite(out[8:]).all())
        assert rel_err(out, ref64(x, sizes, w)) == math.inf
        return {"err": 0.0 if ok else math.inf, "tol": 1.0}

    def several_launches():
        x, sizes, w = make_case(seed, 4, 8, 8, 30, torch.float32, empty_frac=0.0)
        out = numba_grouped.run(K.make_problem(x, sizes, w), config="8x8x4", max_grid_y=2)  # several launches
        return {"err": rel_err(out, ref64(x, sizes, w)), "tol": 1e-5}

    def moe_mlp():
        g = torch.Generator().manual_seed(seed)
        E, H, I, T = 3, 16, 8, 12
        x = torch.randn(T, H, generator=g)
        w13 = torch.randn(E, H, 2 * I, generator=g) / 4
        w2 = torch.randn(E, I, H, generator=g) / 3
        sizes = [5, 0, 7]
        info = {}
        got = K.moe_mlp(x, sizes, [w13[:1], w13[1:]], [(0, w2[:2]), (2, w2[2:])], backend="numba:8x8x4", info=info)
        assert info["down"]["method"] == "numba-sim"
        return {"err": rel_err(got, K.moe_mlp(x, sizes, w13, w2, backend="reference")), "tol": 1e-5}

    def fp8_refused():
        x = torch.randn(4, 16).bfloat16()
        w = torch.randn(2, 16, 16).to(torch.float8_e4m3fn)
        try:
            K.grouped_gemm(x, [2, 2], w, weight_scales=torch.ones(2, 16), backend="numba")
        except BackendUnavailableError as exc:
            assert "fp8" in str(exc)
            return {"err": 0.0, "tol": 1.0}
        raise AssertionError("fp8 weights were not refused")

    def non_cpu_refused():
        x, w = torch.randn(4, 8, device="meta"), torch.randn(2, 8, 8, device="meta")
        try:
            numba_grouped.run(K.make_problem(x, [2, 2], w))
        except BackendUnavailableError as exc:
            assert "CPU tensors" in str(exc), exc
            return {"err": 0.0, "tol": 1.0}
        raise AssertionError("meta tensors were not refused")

    def available_backends():
        assert "numba" in K.available_backends("cpu"), K.available_backends("cpu", reasons=True)
        return {"err": 0.0, "tol": 1.0}

    for name in EXTRA:
        record(name, locals()[name])
    return report


# ---- parent (pytest) -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sim_report():
    if importlib.util.find_spec("numba") is None:
        pytest.skip("numba is not installed (pip install numba numba-cuda)")
    seed = random.SystemRandom().randrange(2**31)
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1",
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, os.path.abspath(__file__), str(seed)], capture_output=True, text=True,
                       env=env, timeout=900)
    if r.returncode == 3:
        pytest.skip(r.stdout.strip().splitlines()[-1])
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(MARK)]
    assert r.returncode == 0 and lines, f"simulator child failed (seed={seed}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return seed, json.loads(lines[-1][len(MARK):])


@pytest.mark.parametrize("name", list(CASES) + EXTRA)
def test_numba_kernel_in_simulator(sim_report, name):
    seed, report = sim_report
    res = report[name]
    assert "raised" not in res, f"seed={seed}: {res['raised']}"
    assert res["err"] < res["tol"], f"seed={seed}: rel err {res['err']:.3g} >= {res['tol']:g} ({res.get('info')})"


if __name__ == "__main__":
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        sys.exit("set NUMBA_ENABLE_CUDASIM=1 (before numba is imported)")
    try:
        from dwdp_comm.kernels.numba_grouped import numba_cuda
        numba_cuda()
    except ImportError as exc:
        print(f"numba-cuda unavailable: {exc}")
        sys.exit(3)
    out = _child(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    print(MARK + json.dumps(out, default=str))

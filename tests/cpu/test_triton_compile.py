"""Every Triton kernel of the library compiles for Hopper (sm90) on this CPU machine (Triton's own
ptxas, no driver), in a fresh process with the interpreter off (tests/helpers/compile_kernels.py):
compile errors show up here, not first on a lent GPU. Also that the swapped MXFP4 order's MMA reads
its first operand, the decoded weights, from registers (its reason: in the direct order the decoded
weights are wgmma's second operand, which always goes through shared memory)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_every_triton_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-m", "tests.helpers.compile_kernels"], capture_output=True, text=True,
                         timeout=900, env=env, cwd=ROOT)
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert rows, run.stdout[-2000:] + run.stderr[-2000:]
    failed = [f"{r['kernel']} {r['config']}: {r['error']}" for r in rows if not r["ok"]]
    assert not failed and run.returncode == 0, "\n".join(failed) or run.stderr[-2000:]
    kernels = {r["kernel"] for r in rows}
    assert {"route", "count", "place", "mxfp4", "mxfp4-swap", "fp8_block", "quant", "dequant_mxfp4",
            "dequant_fp8"} <= kernels, kernels
    mma = {r["kernel"]: r["mma_a"] for r in rows if r["mma_a"]}
    assert mma["mxfp4-swap"] == "registers" and mma["mxfp4-swap-tdec"] == "registers", mma


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_kernel_sass_report(tmp_path):
    """perf/kernel_sass.py compiles its cases for sm90 and finds the K loop of the large tiles."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / "ks.json"
    run = subprocess.run([sys.executable, "-m", "perf.kernel_sass", "--json", str(out)], capture_output=True,
                         text=True, timeout=900, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows and not [r for r in rows if "error" in r], rows
    big = [r for r in rows if r["tile"].startswith("128x128")]
    assert big and all(r["loop_instructions"] and r["regs"] for r in big), big

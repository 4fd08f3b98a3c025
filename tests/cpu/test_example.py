"""examples/deepseek_layer.py runs on CPU (toy size, sim backend) and checks itself."""
import json
import os
import re
import subprocess
import sys

import pytest

from dwdp_comm.testing import gpu_count

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "deepseek_layer.py")


def run(*args):
    return subprocess.run([sys.executable, EXAMPLE, "--size", "toy", "--iters", "1", "--layers", "2", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("mode", ["dwdp", "dep"])
def test_example_runs_and_checks(mode, tmp_path):
    out = tmp_path / "r.json"
    p = run("--mode", mode, "--world-size", "2", "--json", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "# check passed (tolerance 0.02)" in p.stdout
    header = next(l for l in p.stdout.splitlines() if l.lstrip().startswith("rank"))
    assert " GB" not in header and re.search(r"prefetch (B|KiB|MiB)\b", header), header  # toy size: not 0.00 GB
    rows = [l.split() for l in p.stdout.splitlines() if l.strip() and l.split()[0].isdigit()]
    assert len(rows) == 2, p.stdout
    if gpu_count() == 0:  # device memory is not measured on CPU: '-', not 0.00
        assert all(f[5] == "-" and f[6] == "-" for f in rows), p.stdout
    if mode == "dwdp":
        assert all(float(f[4]) >= 1.0 for f in rows), p.stdout  # prefetch volume in a unit that fits
    res = json.loads(out.read_text())
    assert res["tokens_per_s_per_gpu"] > 0 and len(res["per_rank"]) == 2
    for r in res["per_rank"]:
        assert r["rel_error"] < 2e-2
        if mode == "dwdp":
            assert r["backend"] == "sim" and r["prefetch_nbytes"] > 0


@pytest.mark.parametrize("mode", ["dwdp", "dep", "single"])
def test_example_block_fp8_weights(mode):
    """--weights fp8-block: DeepSeek-V3's block-scaled fp8 experts (scales prefetched with the weights)."""
    p = run("--mode", mode, "--world-size", "2", "--weights", "fp8-block")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "weights=fp8_block" in p.stdout and "# check passed (tolerance 0.02)" in p.stdout


def test_example_fails_when_the_check_fails():
    p = run("--mode", "dwdp", "--world-size", "2", "--tolerance", "-1")
    assert p.returncode == 1 and "FAILED" in p.stderr and "check passed" not in p.stdout


@pytest.mark.parametrize("nbytes, unit", [(0, "B"), (1023, "B"), (1024, "KiB"), (5 << 20, "MiB"), (3 << 30, "GiB")])
def test_memory_unit(nbytes, unit):
    from dwdp_comm.moe.runner import memory_unit
    got, scale = memory_unit(nbytes)
    assert got == unit and (nbytes == 0 or 1 <= nbytes / scale < 1024)

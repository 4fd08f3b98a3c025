"""examples/deepseek_layer.py runs on CPU (toy size, sim backend) and checks itself."""
import json
import os
import subprocess
import sys

import pytest

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "deepseek_layer.py")


def run(*args):
    return subprocess.run([sys.executable, EXAMPLE, "--size", "toy", "--iters", "1", "--layers", "2", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("mode", ["dwdp", "dep"])
def test_example_runs_and_checks(mode, tmp_path):
    out = tmp_path / "r.json"
    p = run("--mode", mode, "--world-size", "2", "--json", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(out.read_text())
    assert res["tokens_per_s_per_gpu"] > 0 and len(res["per_rank"]) == 2
    for r in res["per_rank"]:
        assert r["rel_error"] < 2e-2
        if mode == "dwdp":
            assert r["backend"] == "sim" and r["prefetch_nbytes"] > 0


def test_example_fails_when_the_check_fails():
    p = run("--mode", "dwdp", "--world-size", "2", "--tolerance", "-1")
    assert p.returncode == 1 and "FAILED" in p.stderr

"""examples/hf_moe.py runs on CPU (tiny config, sim backend) and checks itself against the unmodified HF model."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "hf_moe.py")


def test_hf_example_runs_and_checks(tmp_path):
    out = tmp_path / "r.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(os.path.dirname(__file__), ".."),
                                                       os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, EXAMPLE, "--model", "olmoe", "--world-size", "2", "--layers", "3",
                        "--json", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "check passed (tolerance" in p.stdout
    res = json.loads(out.read_text())
    assert len(res["per_rank"]) == 2
    for r in res["per_rank"]:
        assert r["backend"] == "sim" and r["tokens_equal"] and r["bytes_pulled"] > 0
        assert r["memory"]["local_bytes"] < r["memory"]["experts_bytes_before"]

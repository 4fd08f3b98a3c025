"""perf/bench_sizes.py runs end to end on CPU (tiny shapes): every family's experts and the model parts."""
import json

import pytest

pytest.importorskip("transformers")


def test_bench_sizes_smoke(tmp_path):
    from perf import bench_sizes
    out = tmp_path / "sizes.json"
    assert bench_sizes.main(["--smoke", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    eager = {(r["family"], r["tokens"]) for r in res["results"]
             if r.get("part") == "experts" and r.get("mode") == "eager" and r["variant"] == "ours"}
    assert {f for f, _ in eager} == set(bench_sizes.FAMILIES)
    assert all(c["ok"] for c in res["checks"])
    modes = {r.get("mode") for r in res["results"] if r.get("part") == "model"}
    assert modes == {"prefill", "decode"}
    assert any(c["part"] == "model_decode" and c["greedy_equal"] for c in res["checks"])
    assert "commit" in res["env"]["git"]

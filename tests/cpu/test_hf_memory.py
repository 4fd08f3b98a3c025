"""perf/hf_memory.py --smoke runs on CPU (sim backend) and its figures add up."""

import json

import pytest

pytest.importorskip("transformers")


def test_hf_memory_smoke(tmp_path, capsys):
    from perf import hf_memory  # the spawned ranks import it as perf.hf_memory
    out = tmp_path / "m.json"
    assert hf_memory.main(["--smoke", "--model", "deepseek_v3", "--world-size", "2",
                                                      "--json", str(out)]) == 0
    assert "full model (5 MoE layers) per rank" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["schema"] == "dwdp/hf_memory/v1" and doc["commit"] and doc["machine"] and doc["backend"] == "sim"
    counts = doc["byte_counts"]["deepseek_v3"]
    rows = {(r["path"], r["rank"]): r for r in doc["rows"]}
    assert set(rows) == {(p, r) for p in ("convert", "load") for r in (0, 1)}
    for path in ("convert", "load"):
        both = [rows[(path, r)] for r in (0, 1)]
        # the ranks' local rows are the whole experts, once
        assert sum(r["local_bytes"] for r in both) == counts["reduced"]["experts_bytes"]
        for r in both:
            assert r["experts_bytes_before"] == counts["reduced"]["experts_bytes"]
            assert r["experts_bytes_after"] == r["local_bytes"] + r["slot_bytes"]
            assert r["heap_bytes"] >= r["local_bytes"]
            f = r["full"]
            assert f["experts_bytes_before"] == counts["full"]["experts_bytes"]
            assert f["dwdp_bytes"] < f["hf_bytes"]
            layers = counts["full"]["moe_layers"] / counts["reduced"]["moe_layers"]
            assert f["local_bytes"] == int(r["local_bytes"] * layers)
    for r in (rows[("load", 0)], rows[("load", 1)]):
        assert r["expert_bytes_read"] == r["local_bytes"]  # the loader read its own rows only (same dtype)

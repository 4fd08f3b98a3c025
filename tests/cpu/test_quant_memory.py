"""perf/quant_memory.py --smoke runs on CPU (sim backend): its streamed FP8 checkpoint loads, and its figures add up."""

import json

import pytest

pytest.importorskip("transformers")

def test_quant_memory_smoke(tmp_path, capsys):
    from perf import quant_memory as script  # a module of the package: the spawned ranks unpickle its rank_main
    out = tmp_path / "q.json"
    assert script.main(["--smoke", "--world-size", "2", "--forward", "4", "--dir", str(tmp_path / "ckpt"),
                        "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "full model (5 MoE layers)" in printed
    doc = json.loads(out.read_text())
    assert doc["schema"] == "dwdp/quant_memory/v1" and doc["commit"] and doc["machine"] and doc["backend"] == "sim"
    red, full = doc["byte_counts"]["reduced"], doc["byte_counts"]["full"]
    rows = doc["rows"]
    assert [r["rank"] for r in rows] == [0, 1]
    # the streamed checkpoint is the one whose bytes were counted: experts (FP8 + scales) + the rest as stored
    assert doc["checkpoint"]["bytes"] > red["experts_bytes"] + red["other_bytes_fp8"]
    assert sum(r["local_bytes"] for r in rows) == red["experts_bytes"]  # the ranks hold every expert once
    for r in rows:
        assert r["weight_format"] == "fp8_block" and r["dequantized_tensors"] > 0
        assert r["expert_bytes_read"] == r["local_bytes"]  # read its own rows and scales, kept FP8
        assert r["experts_bytes_before"] == red["experts_bytes"]
        assert r["heap_bytes"] >= r["local_bytes"] and r["slot_bytes"] > 0
        assert r["forward_finite"]
        f = r["full"]
        assert f["experts_bytes"] == full["experts_bytes"] and f["dwdp_bytes"] < f["replicated_bytes"]
        assert f["dequantize_cost_bytes"] == full["other_bytes"] - full["other_bytes_fp8"] > 0

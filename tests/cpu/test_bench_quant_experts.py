"""perf/bench_quant_experts.py end to end on CPU (its smoke mode: tiny shapes): every variant checked
against the reference, timed, profiled, and written with machine, date and commit."""
import json


def test_smoke_run_writes_checked_timed_and_profiled_rows(tmp_path):
    from perf import bench_quant_experts as B
    path = tmp_path / "q.json"
    assert B.main(["--json", str(path)]) == 0
    d = json.loads(path.read_text())
    assert d["env"]["git"]["commit"] and d["env"]["date"]
    assert {r["model"] for r in d["results"]} == {"deepseek", "gptoss"}
    assert all(c["ok"] for c in d["checks"] if c["variant"] != "hf"), d["checks"]
    for model in ("deepseek", "gptoss"):
        ours = [r for r in d["results"] if r["model"] == model and r["variant"] == "ours"]
        assert ours and ours[0]["ms"] > 0
        prof = {p["variant"]: p for p in d["profiles"] if p["model"] == model}
        assert set(prof) == {"ours", "bf16"} and all(p["total_ms"] > 0 and p["kernels_ms"] for p in prof.values())

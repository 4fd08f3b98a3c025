"""perf/sweep_deepseek.py runs its whole grid machinery on CPU (toy size, sim backend)."""
import json
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def test_sweep_runs_both_modes_and_writes_rows(tmp_path):
    out = tmp_path / "s.json"
    p = subprocess.run([sys.executable, "-m", "perf.sweep_deepseek", "--size", "toy", "--means", "16,24", "--cvs", "0.3",
                        "--weights", "bf16", "--layers", "2", "--iters", "1", "--prefetch-gbps", "100",
                        "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(out.read_text())
    assert res["schema"] == "dwdp/deepseek_sweep/v1" and res["meta"]["commit"]
    assert [(r["prompt_mean"], r["cv"]) for r in res["rows"]] == [(16, 0.3), (24, 0.3)]
    for r in res["rows"]:
        assert r["dwdp_tok_s_gpu"] > 0 and r["dep_tok_s_gpu"] > 0
        assert abs(r["speedup"] - r["dwdp_tok_s_gpu"] / r["dep_tok_s_gpu"]) < 1e-9
        assert r["remote_nbytes_per_layer"] > 0
    for run in res["runs"].values():
        assert run["rel_error"] < 2e-2
        for rank in run["ranks"]:
            assert len(rank["points"]) == 2 and rank["check"]["rel_error_per_layer"]
    assert "speedup" in p.stdout


def test_partial_points_of_a_failed_launch(tmp_path):
    """A launch cut short still reports the points every rank finished (and only those)."""
    from dwdp_comm.moe.runner import partial_points
    (tmp_path / "rank0.jsonl").write_text(json.dumps({"p": 0}) + "\n" + json.dumps({"p": 1}) + "\n")
    (tmp_path / "rank1.jsonl").write_text(json.dumps({"p": 0}) + "\n")
    got = partial_points(str(tmp_path), 2)
    assert [r["points"] for r in got] == [[{"p": 0}], [{"p": 0}]]
    assert partial_points(str(tmp_path), 3) is None  # rank 2 wrote nothing

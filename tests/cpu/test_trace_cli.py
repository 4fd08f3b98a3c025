"""--trace FILE / --telemetry FILE of the command lines on the CPU (sim backend): dwdp-bench contention,
examples/deepseek_layer.py and examples/hf_moe.py write valid traces of every rank, telemetry files
whose routing histogram the advisor's loader reads, and print one line per layer and rank."""

import json
import os
import subprocess
import sys

import pytest

from dwdp_comm.moe import TOY
from dwdp_comm.routing_histogram import load
from dwdp_comm.telemetry import Telemetry
from tests.cpu.test_trace import validate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env():
    env = {k: v for k, v in os.environ.items() if k != "DWDP_COMM_BACKEND"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _check_run(trace, telemetry, ranks, top_k):
    tracks = validate(json.loads(trace.read_text()))
    assert {pid for pid, _ in tracks} == set(range(ranks))
    doc = json.loads(telemetry.read_text())
    assert doc["format"] == "dwdp-telemetry-run" and len(doc["ranks"]) == ranks
    tels = [Telemetry.from_dict(t) for t in doc["ranks"]]
    assert [t.rank for t in tels] == list(range(ranks)) and all(t.prefetches for t in tels)
    h = load(telemetry)  # the advisor's reader takes the whole telemetry file
    assert h.ranks == tuple(range(ranks)) and h.top_k == top_k
    for l, e in h.layers.items():  # the merged histogram is the sum of the ranks' own
        assert e["counts"] == [sum(c) for c in zip(*(t.routing.layers[l]["counts"] for t in tels))]
        assert 0 < sum(e["counts"]) <= e["tokens"] * top_k


def test_contention_trace(tmp_path):
    trace = tmp_path / "c.json"
    p = subprocess.run([sys.executable, "-m", "dwdp_comm.bench.cli", "contention", "--backend", "sim", "-g", "3",
                        "-b", "64K", "-e", "64K", "--chunk", "16K", "-s", "naive,round_robin", "-n", "2", "-w", "1",
                        "--trace", str(trace)], capture_output=True, text=True, timeout=240, env=_env(), cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"# wrote trace {trace} (18 copy jobs, 3 ranks" in p.stdout  # 2 schedules x 3 iterations x 3 ranks
    tracks = validate(json.loads(trace.read_text()))
    jobs = [e for evs in tracks.values() for e in evs if e["cat"] == "prefetch"]
    assert len(jobs) == 2 * 3 * 3  # schedules x (warm-up + timed iterations) x ranks
    assert sum("warm-up" in e["name"] for e in jobs) == 2 * 3


def test_contention_trace_needs_a_real_backend(tmp_path, capsys):
    from dwdp_comm.bench import cli
    rc = cli.main(["contention", "--backend", "model", "--trace", str(tmp_path / "c.json")])
    assert rc == 2 and "--trace: " in capsys.readouterr().err


def test_deepseek_example_trace_and_telemetry(tmp_path):
    trace, tel = tmp_path / "t.json", tmp_path / "tel.json"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "deepseek_layer.py"), "--size", "toy",
                        "--iters", "1", "--layers", "2", "--world-size", "2", "--no-check", "--trace", str(trace),
                        "--telemetry", str(tel)], capture_output=True, text=True, timeout=300, env=_env(), cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    assert sum(line.startswith("# rank ") and " layer " in line for line in p.stdout.splitlines()) == 2 * 2
    _check_run(trace, tel, 2, TOY.top_k)


def test_deepseek_example_trace_needs_dwdp(tmp_path, capsys):
    from examples import deepseek_layer
    with pytest.raises(SystemExit) as ei:
        deepseek_layer.main(["--mode", "dep", "--trace", str(tmp_path / "t.json")])
    assert ei.value.code != 0 and "need --mode dwdp" in capsys.readouterr().err + str(ei.value.code)


def test_hf_example_trace_and_telemetry(tmp_path, capsys):
    pytest.importorskip("transformers")
    from examples import hf_moe  # in this process (its ranks are spawned as usual): no interpreter start
    trace, tel = tmp_path / "t.json", tmp_path / "tel.json"
    rc = hf_moe.main(["--model", "olmoe", "--layers", "2", "--world-size", "2", "--trace", str(trace),
                      "--telemetry", str(tel)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert sum(line.startswith("rank ") and " layer " in line for line in printed.splitlines()) == 2 * 2
    _check_run(trace, tel, 2, json.loads(tel.read_text())["routing"]["top_k"])

"""``dwdp-bench``: output format, JSON schema, skipped rows, #wrong and the exit status.

The model backend runs in-process; the sim backend spawns ranks (a few seconds each), so only two
sim runs are made: one clean, one with an injected corruption.
"""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dwdp_comm.bench.cli import main
from dwdp_comm.bench.units import chunk_text, format_size, parse_size
from dwdp_comm.bench.report import SCHEMA
from dwdp_comm.errors import InvalidArgumentError

ROW_KEYS = {"pattern": str, "schedule": str, "policy": str, "options": dict, "chunk_nbytes": int, "nbytes": int,
            "status": str}
NUM_KEYS = ("time_us", "time_min_us", "time_max_us", "rank_GBps", "agg_GBps", "pair_GBps", "ideal_GBps",
            "pct_ideal")


def check_schema(doc: dict, *, measured: bool) -> None:
    """A small hand-written validator of the ``dwdp-bench/contention/v1`` document."""
    assert doc["schema"] == SCHEMA
    for key, typ in {"command": list, "machine": list, "launcher": str, "backend": str, "backend_reason": str,
                     "group_size": int, "config": dict, "pair_reference_GBps": dict, "rows": list,
                     "wrong_total": int, "skipped": int}.items():
        assert isinstance(doc[key], typ), key
    assert isinstance(doc["date"], str) and doc["date"].startswith("20")
    assert doc["commit"] is None or isinstance(doc["commit"], str)
    assert (doc["model"] is None) == measured
    for k in ("sizes", "chunks", "schedules", "patterns", "skew", "iters", "warmup", "engine_options", "seed"):
        assert k in doc["config"], k
    for size, bw in doc["pair_reference_GBps"].items():
        assert int(size) in doc["config"]["sizes"] and bw > 0
    wrong = 0
    for r in doc["rows"]:
        for key, typ in ROW_KEYS.items():
            assert isinstance(r[key], typ), (key, r)
        assert r["status"] in ("ok", "skipped")
        if r["status"] == "skipped":
            assert isinstance(r["reason"], str) and r["reason"]
            continue
        assert r["reason"] is None
        sim = doc["backend"] == "sim"
        for k in NUM_KEYS:
            if sim and k in ("ideal_GBps", "pct_ideal"):  # no sound ideal on sim: n/a
                assert r[k] is None, (k, r)
                continue
            assert isinstance(r[k], float) and math.isfinite(r[k]) and r[k] > 0, (k, r)
        assert r["time_min_us"] <= r["time_us"] <= r["time_max_us"]
        assert len(r["times_us"]) == r["iters"] >= 1
        assert r["agg_GBps"] == pytest.approx(r["total_nbytes"] / r["time_us"] / 1e3)
        if not sim:
            assert r["pct_ideal"] == pytest.approx(100 * r["agg_GBps"] / r["ideal_GBps"])
        if measured:
            assert isinstance(r["wrong"], int) and r["wrong"] >= 0
            wrong += r["wrong"]
        else:
            assert r["wrong"] is None
    assert doc["wrong_total"] == wrong
    assert doc["skipped"] == sum(r["status"] == "skipped" for r in doc["rows"])


def parse_output(text: str):
    """(preamble lines, header lines, data rows split in fields)."""
    lines = [l for l in text.splitlines() if l.strip()]
    pre, rows = [], []
    for l in lines:
        (pre if l.startswith("#") else rows).append(l)
    header = [l for l in pre if l.startswith("#") and "pattern" in l and "#wrong" in l]
    units = [l for l in pre if "(GB/s)" in l and "(us)" in l]
    return pre, header + units, [l.split() for l in rows]


# ---- model backend (in-process) -------------------------------------------------------------------
def test_model_output_and_json(tmp_path, capsys):
    out = tmp_path / "m.json"
    rc = main(["contention", "--backend", "model", "-b", "16M", "-e", "64M", "-f", "2", "--chunk", "4M,0",
               "-s", "naive,round_robin,parallel,tdm", "-p", "full,ring", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    pre, head, rows = parse_output(text)
    assert any("backend: model" in l for l in pre) and any(l.startswith("# machine:") for l in pre)
    assert any("pair reference" in l for l in pre)
    assert len(head) == 2 and head[0].split()[1:] == ["pattern", "schedule", "chunk", "size", "time", "rank-bw",
                                                      "agg-bw", "ideal", "%ideal", "#wrong"]
    assert len(rows) == 3 * 2 * 4 * 2  # sizes x patterns x schedules x chunks
    for f in rows:
        assert len(f) == 10 and f[0] in ("full", "ring") and f[9] == "-"
        assert int(f[3]) in (16 << 20, 32 << 20, 64 << 20) and int(f[2]) in (4 << 20, 0)
        for x in f[4:9]:
            float(x)
    doc = json.loads(out.read_text())
    check_schema(doc, measured=False)
    assert doc["model"]["executor"] == "per_stream" and doc["model"]["fabric"]["group_size"] == 4


def test_model_skipped_row_and_skew(capsys, tmp_path):
    out = tmp_path / "m.json"
    rc = main(["contention", "--backend", "model", "-b", "8M", "-e", "8M", "--chunk", "2M",
               "-s", "naive+bogus=1,rotated", "--skew", "random", "-n", "2", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert re.search(r"naive\+bogus=1 .*skipped: copy engine options: got \['bogus'\]", text)
    assert "uniform random time" in text
    doc = json.loads(out.read_text())
    check_schema(doc, measured=False)
    ok = [r for r in doc["rows"] if r["status"] == "ok"]
    assert doc["skipped"] == 1 and len(ok) == 1 and ok[0]["iters"] == 2


@pytest.mark.parametrize("argv, msg", [
    (["-s", "fastest"], "schedule: got 'fastest'"),
    (["-b", "8Q"], "-b/--minbytes: got '8Q'"),
    (["-b", "1G", "-e", "8M"], "-b/-e"),
    (["-p", "star"], "pattern: got 'star'"),
    (["--engine-option", "streams"], "engine option: got 'streams'"),
    (["--skew", "sometimes"], "--skew"),
    (["--inject-corruption"], "--inject-corruption"),
    (["-g", "1"], "-g/--group-size"),
])
def test_bad_arguments_exit_2(argv, msg, capsys):
    assert main(["contention", "--backend", "model", *argv]) == 2
    assert msg in capsys.readouterr().err


def test_units_parse_and_format_sizes():
    assert parse_size("8M") == 8 << 20 and parse_size("1G") == 1 << 30 and parse_size("4k") == 4096
    assert parse_size("512KiB") == 512 << 10 and parse_size("100") == 100
    with pytest.raises(InvalidArgumentError, match="--chunk: got '8Q'"):
        parse_size("8Q", "--chunk")
    assert [format_size(n) for n in (8 << 20, 3 << 30, 1536, 100)] == ["8M", "3G", "1536", "100"]
    assert [chunk_text(n) for n in (0, 8 << 20, 4096)] == ["whole-copy", "8 MiB", "4096 B"]


def _bench_import_graph() -> dict:
    """Module -> the dwdp_comm.bench modules it imports, at any depth of its code (lazy imports too)."""
    import ast
    root = Path(__file__).resolve().parents[2] / "dwdp_comm" / "bench"
    names = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in names.items():
        pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        out = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = pkg
                for _ in range(node.level - 1):
                    base = base.rsplit(".", 1)[0]
                mod = (base + ("." + node.module if node.module else "")) if node.level else node.module
                out |= {f"{mod}.{a.name}" if f"{mod}.{a.name}" in names else mod for a in node.names} & set(names)
            elif isinstance(node, ast.Import):
                out |= {a.name for a in node.names} & set(names)
        graph[name] = out - {name}
    return graph


def test_bench_has_no_import_cycle():
    graph = _bench_import_graph()
    assert "dwdp_comm.bench.cli" in graph and "dwdp_comm.bench.advise.predict" in graph
    # a cycle is a module that reaches itself
    for start in graph:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            assert m != start, f"import cycle through {start}"
            if m not in seen:
                seen.add(m)
                todo += graph[m]
    # the one that was there: advise_cli took parse_size from cli, which imports advise_cli
    assert "dwdp_comm.bench.cli" not in graph["dwdp_comm.bench.advise_cli"]


def test_calibrate_and_predict(capsys):
    assert main(["calibrate"]) == 0
    text = capsys.readouterr().out
    assert "DEVICE_NOTES.md" in text and text.count("| ") > 15 and "worst error" in text
    source = next(l for l in text.splitlines() if l.startswith("# calibration:"))
    assert not re.search(r"(^|\s)/\w", source), source  # no local absolute path
    assert main(["predict", "-g", "4", "-b", "64M", "--trials", "1"]) == 0
    text = capsys.readouterr().out
    assert "parallel" in text and "fair" in text and "fifo" in text
    pre = [l for l in text.splitlines() if l.startswith("#")]
    assert "MODEL" in pre[0] and "not measurements" in pre[0]
    assert any("fair = " in l and "fifo = " in l for l in pre)
    assert any(l.startswith("# fabric h200x4") for l in pre)


def test_model_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "m.png"
    assert main(["contention", "--backend", "model", "-b", "8M", "-e", "16M", "--chunk", "2M",
                 "-s", "naive,round_robin", "--plot", str(png)]) == 0
    assert f"wrote {png}" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- sim backend (spawned ranks) ------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[2]


def _cli(*argv, timeout=240):
    env = {k: v for k, v in os.environ.items() if k != "DWDP_COMM_BACKEND"}
    return subprocess.run([sys.executable, "-m", "dwdp_comm.bench.cli", "contention", *argv], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def test_sim_clean_run(tmp_path):
    out = tmp_path / "s.json"
    png = tmp_path / "s.png"
    p = _cli("--backend", "sim", "-g", "3", "-b", "64K", "-e", "128K", "-f", "2", "--chunk", "16K",
             "-s", "naive,round_robin,parallel", "-p", "full,one-from-all", "-n", "2", "-w", "1",
             "--json", str(out), "--plot", str(png))
    try:
        import matplotlib  # noqa: F401
        have_mpl = True
    except ImportError:
        have_mpl = False
    assert p.returncode == (0 if have_mpl else 3), p.stdout + p.stderr  # 3: the plot was not written
    pre, head, rows = parse_output(p.stdout)
    assert any(l.startswith("# backend: sim") and "NO GPU" in l for l in pre)
    assert any(l.startswith("# ideal, %ideal: n/a on sim") for l in pre)
    assert len(head) == 2
    assert len(rows) == 2 * 2 * 3
    ok = [f for f in rows if "skipped:" not in " ".join(f)]
    skipped = [f for f in rows if "skipped:" in " ".join(f)]
    assert len(ok) == 8 and len(skipped) == 4  # sim has no streams option: 'parallel' rows are skipped
    assert all(f[9] == "0" for f in ok)
    assert all(f[7] == "n/a" and f[8] == "n/a" for f in ok)  # ideal, %ideal
    doc = json.loads(out.read_text())
    check_schema(doc, measured=True)
    assert doc["backend"] == "sim" and doc["group_size"] == 3 and doc["wrong_total"] == 0
    if not have_mpl:
        assert "plot skipped: matplotlib is not installed" in p.stdout
        assert "error: plot skipped" in p.stderr
    else:
        assert f"wrote {png}" in p.stdout and png.read_bytes()[:4] == b"\x89PNG"


def test_sim_injected_corruption_is_counted_and_fails(tmp_path):
    out = tmp_path / "c.json"
    p = _cli("--backend", "sim", "-g", "2", "-b", "64K", "-e", "64K", "--chunk", "16K", "-s", "naive,round_robin",
             "-p", "full,pair", "-n", "1", "-w", "0", "--inject-corruption", "--json", str(out))
    assert p.returncode == 1, p.stdout + p.stderr
    _, _, rows = parse_output(p.stdout)
    # corrupt_copy=0 flips one byte of the first copy of every job: one byte per receiving rank
    assert [int(f[9]) for f in rows] == [2, 2, 1, 1]
    assert "FAILED" in p.stdout
    doc = json.loads(out.read_text())
    check_schema(doc, measured=True)
    assert doc["wrong_total"] == 6


def test_under_torchrun(tmp_path):
    """RANK/WORLD_SIZE set: the CLI runs as torchrun's rank instead of spawning its own."""
    out = tmp_path / "t.json"
    env = {k: v for k, v in os.environ.items() if k != "DWDP_COMM_BACKEND"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                        "dwdp_comm.bench.cli", "contention", "--backend", "sim", "-b", "64K", "-e", "64K", "--chunk", "16K",
                        "-s", "round_robin", "-n", "1", "-w", "0", "--json", str(out)],
                       capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads(out.read_text())
    check_schema(doc, measured=True)
    assert doc["launcher"].startswith("torchrun") and doc["group_size"] == 2 and len(doc["rows"]) == 1
    assert p.stdout.count("# dwdp-bench contention") == 1  # rank 0 prints, once


# ---- help, renamed options, exit statuses ---------------------------------------------------------
def _help(*sub) -> None:
    with pytest.raises(SystemExit) as e:
        main([*sub, "--help"])
    assert e.value.code == 0


@pytest.mark.parametrize("sub", ["contention", "predict"])
def test_help_states_each_default_once_and_every_option_has_help(sub, capsys):
    _help(sub)
    text = capsys.readouterr().out
    assert "%%" not in text and "(default: None)" not in text
    assert not re.search(r"default[^()]*\(default", text), "a default stated twice"
    assert not _options_without_help(text), f"{sub}: options without help"


def _options_without_help(text: str) -> list[str]:
    """The options in an argparse help text's "options:" section that have no help text: an
    option line with nothing after its invocation and no indented help line below it."""
    lines = text.split("options:", 1)[1].splitlines()
    bare = []
    for i, line in enumerate(lines):
        if not line.startswith("  -"):
            continue
        has_inline = re.match(r"  \S.*?\s{2,}\S", line) is not None
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        has_below = nxt.startswith(" " * 8) and not nxt.lstrip().startswith("-")
        if not (has_inline or has_below):
            bare.append(line.strip())
    return bare


def test_options_without_help_finds_a_bare_option():
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--with-help", help="some words")
    ap.add_argument("--a-very-long-option-name-that-wraps", metavar="A_LONG_METAVAR", help="words below")
    ap.add_argument("--bare")
    assert _options_without_help(ap.format_help()) == ["--bare BARE"]


@pytest.mark.parametrize("short, long_", [("-c", "--chunk"), ("-o", "--engine-option")])
def test_short_options_that_collide_with_nccl_tests_are_refused(short, long_, capsys):
    with pytest.raises(SystemExit) as e:
        main(["contention", "--backend", "model", short, "8M"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{short} was dropped" in err and f"use {long_}" in err and "nccl-tests" in err


def test_every_row_skipped_exits_3(capsys):
    rc = main(["contention", "--backend", "model", "-b", "8M", "-e", "8M", "--chunk", "2M", "-s", "naive+bogus=1"])
    captured = capsys.readouterr()
    assert rc == 3
    assert "every row (1) was skipped" in captured.err


def test_plot_not_written_exits_3(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    png = tmp_path / "m.png"
    rc = main(["contention", "--backend", "model", "-b", "8M", "-e", "8M", "--chunk", "2M", "-s", "naive",
               "--plot", str(png)])
    captured = capsys.readouterr()
    assert rc == 3 and not png.exists()
    assert "matplotlib is not installed" in captured.err and "[plot]" in captured.out


def test_python_m_dwdp_comm_bench():
    p = subprocess.run([sys.executable, "-m", "dwdp_comm.bench", "contention", "--backend", "model", "-b", "8M",
                        "-e", "8M", "--chunk", "2M", "-s", "naive"], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "# backend: model" in p.stdout


def test_sim_rows_have_no_ideal():
    from dwdp_comm.bench.contention import without_ideal
    row = {"status": "ok", "ideal_GBps": 3.0, "pct_ideal": 250.0, "agg_GBps": 7.5}
    assert without_ideal(row) == {"status": "ok", "ideal_GBps": None, "pct_ideal": None, "agg_GBps": 7.5}

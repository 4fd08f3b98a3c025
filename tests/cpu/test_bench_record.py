"""dwdp_comm.bench.record (the run record of result files) and dwdp_comm.bench.timing (CPU)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from dwdp_comm.bench import record, timing
from dwdp_comm.errors import InvalidArgumentError


def test_commit_is_the_checkout_head_or_the_environment(monkeypatch):
    monkeypatch.delenv(record.ENV_COMMIT, raising=False)
    if shutil.which("git"):
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=record.REPO_ROOT, capture_output=True, text=True)
        if head.returncode == 0:
            assert record.commit() == head.stdout.strip()
            assert head.stdout.strip().startswith(record.commit(short=True))
            assert record.is_dirty() in (True, False)
    monkeypatch.setenv(record.ENV_COMMIT, "abc123")
    assert record.commit() == record.commit(short=True) == "abc123"
    assert record.is_dirty() is False  # a copied tree: nothing to compare against


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_commit_of_a_copied_tree_is_never_the_enclosing_repository(tmp_path):
    """A copy of the package without ``.git`` inside another checkout (the device machine's copy of
    the working tree): ``commit()`` is ``$DWDP_GIT_COMMIT`` or unknown, never the outer HEAD."""
    import os
    import sys
    outer = tmp_path / "outer"
    outer.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_") and k != record.ENV_COMMIT}
    for args in (["init", "-q"], ["commit", "-q", "--allow-empty", "-m", "outer"]):
        subprocess.run(git + args, cwd=outer, check=True, env=env, capture_output=True)
    outer_head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=outer, capture_output=True, text=True,
                                env=env).stdout.strip()
    inner = outer / "copy"
    shutil.copytree(os.path.join(record.REPO_ROOT, "dwdp_comm"), inner / "dwdp_comm",
                    ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import dwdp_comm.bench.record as r; import os; "
            "print(os.path.realpath(r.REPO_ROOT), r.commit(), r.commit(short=True), r.is_dirty())")
    run = lambda extra: subprocess.run([sys.executable, "-c", code], cwd=inner, capture_output=True, text=True,  # noqa: E731
                                       env={**env, "PYTHONPATH": str(inner), **extra}, timeout=120)
    out = run({})
    assert out.returncode == 0, out.stderr
    root, full, short, dirty = out.stdout.split()
    assert root == os.path.realpath(inner)
    assert outer_head not in out.stdout and not outer_head.startswith(short)
    assert (full, short, dirty) == ("None", "None", "None")
    out = run({record.ENV_COMMIT: "c0ffee"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[1:] == ["c0ffee", "c0ffee", "False"]


def test_only_the_run_record_asks_git_for_the_commit():
    """A script that runs ``git rev-parse HEAD`` itself records an enclosing repository's commit when
    its tree is a copy without ``.git`` (what record.commit fixed): every script goes through it."""
    import pathlib
    root = pathlib.Path(record.REPO_ROOT)
    own = root / "dwdp_comm" / "bench" / "record.py"
    offenders = [str(f.relative_to(root)) for d in ("dwdp_comm", "perf", "examples") for f in (root / d).rglob("*.py")
                 if f != own and '"rev-parse"' in f.read_text()]
    assert offenders == [], offenders


def test_result_path_and_write_json(tmp_path, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    assert record.result_path(None, "x.json") is None
    assert record.result_path(str(tmp_path / "given.json"), "x.json") == str(tmp_path / "given.json")
    monkeypatch.setenv("OUT", str(tmp_path))
    path = record.result_path(None, "x.json")
    assert path == str(tmp_path / "x.json")
    assert record.write_json(path, {"a": 1, "b": tmp_path}) == path
    import json
    assert json.loads(open(path).read()) == {"a": 1, "b": str(tmp_path)}
    nested = str(tmp_path / "sub" / "dir" / "y.json")
    assert record.write_json(nested, [1]) == nested and json.loads(open(nested).read()) == [1]
    assert record.write_json(None, [1]) is None


def test_env_info_keeps_the_benchmark_keys(monkeypatch):
    """perf/bench_grouped_gemm.py's committed results have exactly these env keys (CPU run)."""
    monkeypatch.setenv(record.ENV_COMMIT, "deadbeef")
    info = record.env_info("cpu", modules=("numba", "surely_not_a_module_xyz"))
    assert set(info) == {"host", "python", "torch", "torch_cuda", "date", "git", "device", "gpu", "numba",
                         "surely_not_a_module_xyz"}
    assert info["git"] == {"commit": "deadbeef", "dirty": False} and info["device"] == "cpu"
    assert info["gpu"] is None and info["surely_not_a_module_xyz"] is None and info["torch"] == torch.__version__
    v = record.versions("surely_not_a_module_xyz")
    assert v["surely_not_a_module_xyz"].startswith("unavailable (") and v["torch"] == torch.__version__
    assert record.utc_date().endswith("+00:00") and record.machine_lines()[0].startswith("machine: ")


def test_timer_rounds_and_summary():
    """One value per round and variant; the base's ratio to itself is 1 in every round."""
    t = timing.Timer(torch.device("cpu"), block_ms=1.0, warmup_ms=0.0)
    x = torch.randn(32, 32)
    times = t.rounds({"a": lambda: x @ x, "b": lambda: x @ x @ x}, reps=3)
    assert set(times) == {"a", "b"} and all(len(v) == 3 and all(ms > 0 for ms in v) for v in times.values())
    rows = timing.summarize_times(times, "a", 2 * 32 ** 3, {"tokens": 32}, "s", t.calls)
    by = {r["variant"]: r for r in rows}
    assert by["a"]["ratio"] == 1.0 and by["a"]["tokens"] == 32 and by["b"]["calls_per_block"] == t.calls["b"]
    assert by["a"]["ms_p10"] <= by["a"]["ms"] <= by["a"]["ms_p90"]
    with pytest.raises(InvalidArgumentError, match="order"):
        timing.Timer(torch.device("cpu"), order="sorted")


def test_rel_err_and_pct():
    a = torch.randn(4, 5)
    assert timing.rel_err(a, a) == 0.0
    assert timing.rel_err(a[:3], a) == float("inf")
    assert timing.rel_err(torch.full_like(a, float("nan")), a) == float("inf")
    assert abs(timing.rel_err(a * 1.5, a) - 0.5) < 1e-6
    assert timing.pct([3.0, 1.0, 2.0], 0.5) == 2.0 and timing.pct([1.0, 2.0], 0.25) == 1.25
    assert timing.pct([], 0.5) != timing.pct([], 0.5)  # NaN


def test_split_weights_on_sim_are_pieces_and_their_composite(seed):
    """SplitWeights on a one-rank sim group: pieces in separate buffers, the composite the same
    bytes mapped back to back (a grouped GEMM on either equals the contiguous one); pieces off
    the map granularity get pieces only, with the reason; bad cuts name the argument."""
    import dwdp_comm.kernels as K
    from dwdp_comm.bench.split_weights import SplitWeights, single_rank_group
    g = torch.Generator().manual_seed(seed)
    with single_rank_group("sim") as group:
        w = torch.randn(8, 64, 32, generator=g).bfloat16()  # 4 KiB per expert: the sim page
        x, sizes = torch.randn(50, 64, generator=g).bfloat16(), [7, 0, 9, 3, 11, 0, 15, 5]
        sw = SplitWeights(group, w, [0, 2, 5, 8])
        try:
            assert sw.why_not is None and torch.equal(sw.composite, w)
            assert [a for a, _ in sw.segments] == [0, 2, 5] and all(torch.equal(p, w[a:a + len(p)])
                                                                     for a, p in sw.segments)
            assert len({p.data_ptr() for _, p in sw.segments} | {sw.composite.data_ptr()}) == 4
            want = K.grouped_gemm(x, sizes, w)
            info = {}
            assert torch.equal(K.grouped_gemm(x, sizes, sw.composite, info=info), want) and \
                info["method"] == "grouped_mm"
            assert timing.rel_err(K.grouped_gemm(x, sizes, sw.segments), want) < 1e-2
        finally:
            sw.close()
        odd = SplitWeights(group, torch.randn(3, 10, 10), [0, 1, 3])
        assert odd.composite is None and "granularity" in odd.why_not and len(odd.segments) == 2
        odd.close()
        with pytest.raises(InvalidArgumentError, match="cuts"):
            SplitWeights(group, w, [0, 5, 5, 8])


def test_routed_counts_are_deterministic_top_k_counts(seed):
    from dwdp_comm.bench.workload import routed_counts
    counts, stats = routed_counts(3000, 64, 8, seed)
    assert len(counts) == 64 and sum(counts) == 3000 * 8 == stats["rows"]
    assert max(counts) <= 3000 and routed_counts(3000, 64, 8, seed) == (counts, stats)
    assert stats["max_over_mean"] > 1.2  # uneven, as real routing


def test_memory_figures_are_none_on_cpu():
    """No CUDA device: neither figure is invented (None, not 0, in the result files)."""
    from dwdp_comm.bench import memory
    assert memory.torch_allocated("cpu") is None and memory.device_used("cpu") is None

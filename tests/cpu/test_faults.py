"""Fault cases of issue 13 on the sim backend: each failed (wrong data, crash, hang or raw error)
before the failure model of docs/design.md and must pass now. The cases perf/fault_times.py times
are in perf/fault_cases.py; the others in tests/helpers/fault_rankfns.py."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import dwdp_comm as dc
from dwdp_comm import comm
from perf import fault_cases
from tests.helpers import fault_rankfns

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("kind", ["meta", "sparse"])
def test_commit_local_failure_raises_on_every_rank(kind, seed):
    """Item 1: one rank cannot place its shard: no rank returns from commit(), all raise the same
    error naming it, and the group still works afterwards."""
    res = dc.testing.launch(fault_cases.commit_local_failure, 3, 1, kind, seed, timeout=120)
    msgs = {r["error"]["msg"] for r in res if r["error"]}
    assert all(r["error"] is not None for r in res), res
    assert len(msgs) == 1, msgs
    for r in res:
        assert r["error"]["type"] == "CollectiveFailedError" and r["error"]["ranks"] == [1], r
        assert "rank 1" in r["error"]["msg"] and "WeightStore.commit" in r["error"]["msg"]
        assert r["closed"] and r["use_after"][0] == "ClosedError" and "failed commit()" in r["use_after"][1]
        assert r["after_ok"]


def test_views_stay_valid_after_close(seed):
    """Item 2: views kept past Prefetcher.close()/WeightStore.close() are readable (gather-mode
    sizes that are not multiples of 4 KiB used to SIGSEGV)."""
    res = dc.testing.launch(fault_rankfns.views_after_close, 2, 5, seed)
    for r in res:
        assert all(r.values()), r


def test_writes_through_views_never_reach_peers(seed):
    """Item 3: weights(), weight_segments() and local() are read-only by contract; on sim a write is
    copy-on-write: no peer and no later prefetch sees it (composite and gather names)."""
    res = dc.testing.launch(fault_rankfns.write_through_view, 3, 7, seed)
    for r in res:
        assert r["modes"]["w13"] == "composite" and r["modes"]["w2"] == "gather"
        assert all(r["clean"].values()), r


def test_stuck_rank_times_out_naming_it():
    """Item 4: a late rank makes the others raise CollectiveTimeoutError naming it, after the
    group's timeout (init(timeout=...)), not gloo's."""
    res = dc.testing.launch(fault_cases.stuck_rank, 3, 2, 8.0, options={"timeout": 2}, timeout=60)
    for rank in (0, 1):
        r = res[rank]
        assert r and r["type"] == "CollectiveTimeoutError", r
        assert r["missing"] == [2] and "Group.barrier" in r["msg"] and f"on rank {rank}" in r["msg"]
        assert r["time_to_error_s"] < 10


def test_timeout_setting_is_validated(monkeypatch):
    monkeypatch.setenv("DWDP_COMM_TIMEOUT", "soon")
    with pytest.raises(dc.InvalidArgumentError, match="^DWDP_COMM_TIMEOUT: got 'soon'"):
        comm.resolve_timeout()
    monkeypatch.setenv("DWDP_COMM_TIMEOUT", "12.5")
    assert comm.resolve_timeout() == 12.5 and comm.resolve_timeout(3) == 3.0
    monkeypatch.delenv("DWDP_COMM_TIMEOUT")
    assert comm.resolve_timeout() == comm.DEFAULT_TIMEOUT_S < 1800
    with pytest.raises(dc.InvalidArgumentError, match="^timeout: got -1"):
        comm.resolve_timeout(-1)


def _shm_files():
    return set(glob.glob("/dev/shm/dwdp-*"))


@pytest.mark.parametrize("where", ["barrier", "commit"])
def test_dead_rank_is_named_and_leaves_no_shm(where, tmp_path):
    """Item 4: survivors of a dead rank raise a DwdpError naming the step and the rank (not gloo's
    raw error); a rank dying inside commit's heap step leaves no /dev/shm file."""
    before = _shm_files()
    with pytest.raises(dc.RankFailedError) as ei:
        dc.testing.launch(fault_cases.dead_rank, 3, 1, where, str(tmp_path), timeout=60)
    assert ei.value.rank == 1 and "died" in str(ei.value)
    reports = {p: json.load(open(p)) for p in glob.glob(str(tmp_path / "rank*.json"))}
    assert reports, "no survivor reported before launch killed it"
    for p, r in reports.items():
        assert r and r["type"] in ("TransportError", "CollectiveTimeoutError"), (p, r)
        assert r["missing"] == [1] and "rank(s) [1] had not arrived" in r["msg"], (p, r)
    assert _shm_files() <= before, _shm_files() - before


def test_close_is_idempotent_in_any_order(seed):
    """Item 5: close() twice, the store before its prefetcher or after: no error."""
    res = dc.testing.launch(fault_rankfns.close_order_and_twice, 2, seed)
    assert res == [{"store_first": None, "prefetcher_first": None}] * 2


def test_exit_during_exception_is_local():
    """Item 5: __exit__ while an exception unwinds on one rank releases locally at once; the other
    ranks' close() fails naming it instead of meeting its barrier and returning normally."""
    res = dc.testing.launch(fault_cases.exit_during_exception, 3, 0, options={"timeout": 2}, timeout=60)
    bad = res[0]
    assert bad["exit_s"] < 1.5 and bad["closed"], bad
    for r in res[1:]:
        assert r["error"] and r["error"]["type"] == "CollectiveTimeoutError" and r["error"]["missing"] == [0], r


def test_launch_ranks_die_with_a_killed_parent(tmp_path):
    """Item 4: kill -9 of the launching process takes its rank processes with it."""
    code = ("import dwdp_comm as dc; from perf import fault_cases; "
            "dc.testing.launch(fault_cases.pid_and_sleep, 2, %r, timeout=300)" % str(tmp_path))
    # cwd: the repository root, where ``python -c`` finds the perf package
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ), start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(glob.glob(str(tmp_path / "*.pid"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        pids = [int(open(p).read()) for p in glob.glob(str(tmp_path / "*.pid"))]
        assert len(pids) == 2, "the ranks never started"
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        alive = pids
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = [p for p in pids if _alive(p)]
        assert not alive, f"rank processes {alive} outlived their parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        for p in glob.glob(str(tmp_path / "*.pid")):
            try:
                os.kill(int(open(p).read()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_stuck_rank_under_torchrun():
    """Item 4 under torchrun: rank 0's barrier raises CollectiveTimeoutError naming rank 1 after the
    library's timeout (3 s here), not gloo's 30 minutes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "tests.helpers.fault_rankfns", "stuck"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    lines = [l for l in (out.stdout + out.stderr).splitlines() if "RESULT" in l]
    assert lines and "CollectiveTimeoutError missing=[1]" in lines[0], out.stdout[-3000:] + out.stderr[-3000:]
    assert out.returncode == 0, out.stderr[-3000:]


def test_nvshmem_heap_abort_is_local_and_peers_raise():
    """Item 5 on nvshmem (fake nvshmem4py): abort() of a heap releases it locally, with no group
    step and no NVSHMEM collective (nvshmem_free); the peers' close() raises naming the rank and
    never enters nvshmem_free, which would wait for it forever."""
    res = dc.testing.launch(fault_cases.nvshmem_heap_abort, 3, 1, options={"timeout": 2}, timeout=90)
    bad = res[1]
    assert bad["calls"] == [] and bad["seconds"] < 1.0, bad
    for r in (res[0], res[2]):
        assert r["error"] and r["error"]["type"] == "CollectiveTimeoutError" and r["error"]["missing"] == [1], r
        assert "nvshmem: closing the heap" in r["error"]["msg"] and r["calls"] == [] and r["released"], r


def test_nvshmem_heap_creation_waits_for_every_rank_first():
    """A rank that never reaches heap creation is named by the others' CollectiveTimeoutError, raised
    before they enter nvshmem.core.buffer (collective inside NVSHMEM, no timeout)."""
    res = dc.testing.launch(fault_cases.nvshmem_heap_late_rank, 2, 1, options={"timeout": 2}, timeout=90)
    r = res[0]
    assert r["error"] and r["error"]["type"] == "CollectiveTimeoutError" and r["error"]["missing"] == [1], r
    assert r["calls"] == [], r


def test_group_abort_releases_the_backend_locally():
    assert dc.testing.launch(fault_rankfns.group_abort_uses_backend_abort, 2) == [["abort"]] * 2


def test_heap_writes_are_detected_on_every_rank(seed):
    """Item 3: a write that reaches a rank's heap (through a GPU composite view; here straight into
    the heap) is found by testing.check_local_unchanged, which raises on every rank naming the rank
    and the tensor. sim's copy-on-write views keep the heap clean. A bad digest names the argument."""
    res = dc.testing.launch(fault_cases.heap_write_detection, 3, 2, seed)
    msgs = {r["after_heap_write"]["msg"] for r in res}
    assert len(msgs) == 1, msgs
    for r in res:
        assert r["after_views"] is None, r
        err = r["after_heap_write"]
        assert err["type"] == "CollectiveFailedError" and err["ranks"] == [2], r
        assert "layer 1, 'w2'" in err["msg"] and "check_local_unchanged" in err["msg"], err
        assert r["bad_digest"][0] == "InvalidArgumentError" and r["bad_digest"][1].startswith("digest: got"), r
        assert r["keys"] == sorted([l, n] for l in (0, 1) for n in fault_cases.NAMES), r["keys"]


def test_ranks_in_different_steps_all_raise():
    """Item 1's shape: one rank's barrier meets the others' commit; nobody returns normally."""
    res = dc.testing.launch(fault_cases.steps_mismatch, 3, options={"timeout": 20})
    for r in res:
        assert r and r["type"] == "CollectiveMismatchError", res
        assert "rank 0: step 'Group.barrier'" in r["msg"] and "WeightStore.commit" in r["msg"], r


def test_close_agrees_on_a_copy_failure_found_there(seed):
    """A copy that failed on one rank, found only when the store closes, fails close() on every rank
    with the same error naming that rank (the heap is freed anyway)."""
    res = dc.testing.launch(fault_cases.close_with_failed_copy, 3, 1, seed, options={"timeout": 20})
    assert len({r["msg"] for r in res}) == 1, res
    for r in res:
        assert r["type"] == "CollectiveFailedError" and r["ranks"] == [1], r
        assert "WeightStore.close" in r["msg"] and "injected copy failure" in r["msg"] and r["closed"], r

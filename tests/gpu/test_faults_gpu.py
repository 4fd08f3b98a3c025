"""GPU equivalents of the sim fault cases (issue 13, items 1, 2 and 4) where cuda_ipc differs from
sim: device copies in commit, views that own device allocations and VMM composites, heaps mapped
by peers. Two ranks; they may share one GPU (rank r uses GPU r % device_count). Skipped without a
GPU. ``DWDP_TEST_TIMEOUT`` (default 180 s) bounds each launch."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import dwdp_comm as dc
from tests.helpers import gpu_rankfns as fns

pytestmark = pytest.mark.gpu

TIMEOUT = float(os.environ.get("DWDP_TEST_TIMEOUT", "180"))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_commit_device_copy_failure_raises_on_every_rank(seed):
    res = dc.testing.launch(fns.commit_local_failure, 2, 1, seed, backend="cuda_ipc", timeout=TIMEOUT)
    assert len({r["error"]["msg"] for r in res if r["error"]}) == 1
    for r in res:
        assert r["error"] and r["error"]["type"] == "CollectiveFailedError" and r["error"]["ranks"] == [1], r
        assert r["closed"] and r["after_ok"], r


@pytest.mark.parametrize("vmm", [None, False])
@pytest.mark.parametrize("engine", [{}, {"streams": 2}])
def test_views_stay_valid_after_close(vmm, engine, seed):
    res = dc.testing.launch(fns.views_after_close, 2, seed, engine, backend="cuda_ipc", options={"vmm": vmm},
                            timeout=TIMEOUT)
    for r in res:
        assert all(r.values()), r


def test_stuck_rank_times_out_naming_it():
    res = dc.testing.launch(fns.stuck_rank, 2, 1, 10.0, backend="cuda_ipc", options={"timeout": 3},
                            timeout=TIMEOUT)
    r = res[0]
    assert r and r["type"] == "CollectiveTimeoutError" and r["missing"] == [1], r


def test_dead_rank_in_commit_is_named(tmp_path):
    with pytest.raises(dc.RankFailedError) as ei:
        dc.testing.launch(fns.dead_rank_in_commit, 2, 1, str(tmp_path), backend="cuda_ipc",
                          options={"timeout": 20}, timeout=TIMEOUT)
    assert ei.value.rank == 1
    reports = [json.load(open(p)) for p in glob.glob(str(tmp_path / "rank*.json"))]
    assert reports
    for r in reports:
        assert r and r["type"] in ("TransportError", "CollectiveTimeoutError") and r["missing"] == [1], r


def test_gpu_ranks_die_with_a_killed_parent(tmp_path):
    code = ("import dwdp_comm as dc; from tests.helpers import gpu_rankfns; "
            "dc.testing.launch(gpu_rankfns.pid_and_sleep, 2, %r, backend='cuda_ipc', timeout=300)" % str(tmp_path))
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, start_new_session=True)  # cwd: tests importable
    try:
        deadline = time.monotonic() + TIMEOUT
        while len(glob.glob(str(tmp_path / "*.pid"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        pids = [int(open(p).read()) for p in glob.glob(str(tmp_path / "*.pid"))]
        assert len(pids) == 2
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 20
        alive = pids
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            alive = [p for p in pids if os.path.exists(f"/proc/{p}") and
                     open(f"/proc/{p}/stat").read().split(") ")[1][0] != "Z"]
        assert not alive, f"GPU rank processes {alive} outlived their parent"
    finally:
        if parent.poll() is None:
            parent.kill()


def _need_backend(backend: str) -> None:
    if backend == "nvshmem":
        import importlib.util
        if importlib.util.find_spec("nvshmem") is None:
            pytest.skip("nvshmem4py is not installed (pip install nvshmem4py-cu13)")


@pytest.mark.parametrize("backend, engine", [
    ("cuda_ipc", {}),
    ("cuda_ipc", {"sync": "slot"}),
    pytest.param("nvshmem", {}, marks=pytest.mark.multigpu),
    pytest.param("nvshmem", {"sync": "slot"}, marks=pytest.mark.multigpu),
])
def test_exception_on_one_rank_is_local_and_named(backend, engine):
    """__exit__ during an exception on one rank: local release, fast (no collective, no NVSHMEM
    free/finalize); the other rank's close() raises naming it instead of hanging."""
    _need_backend(backend)
    res = dc.testing.launch(fns.exception_on_one_rank, 2, 1, engine, backend=backend, options={"timeout": 5},
                            timeout=TIMEOUT)
    bad, other = res[1], res[0]
    assert bad["closed"] and bad["exit_s"] < 3.0, bad
    err = other["error"]
    assert err and err["type"] in ("CollectiveTimeoutError", "TransportError") and err["missing"] == [1], other


def test_writes_through_composite_views_are_detected(seed):
    """Views are read-only by contract; on cuda_ipc (VMM) a write through a composite view reaches the
    heap, and testing.check_local_unchanged finds it on every rank, naming the writer."""
    res = dc.testing.launch(fns.heap_write_detection, 2, 0, seed, backend="cuda_ipc", timeout=TIMEOUT)
    composite = [n for n, m in res[0]["modes"].items() if m == "composite"]
    for r in res:
        if composite:
            assert r["error"] and r["error"]["type"] == "CollectiveFailedError" and r["error"]["ranks"] == [0], r
            assert all(f"'{n}'" in r["error"]["msg"] for n in composite), r
        else:  # legacy IPC: every view is a gathered copy, the heap stays clean
            assert r["error"] is None, r

import os
import time

import pytest

import dwdp_comm as dc
from perf import fault_cases
from tests.helpers import launch_rankfns


def test_unknown_backend_lists_valid():
    with pytest.raises(dc.InvalidArgumentError) as ei:
        dc.init("mpi")
    msg = str(ei.value)
    assert msg.startswith("backend: got 'mpi'")
    for name in ("auto", "sim", "cuda_ipc", "nvshmem"):
        assert name in msg


def test_unknown_env_backend(monkeypatch):
    monkeypatch.setenv("DWDP_COMM_BACKEND", "fast")
    with pytest.raises(dc.InvalidArgumentError, match="^DWDP_COMM_BACKEND: got 'fast'"):
        dc.init()


def test_needs_torch_distributed():
    with pytest.raises(dc.DwdpError, match="torch.distributed is not initialized"):
        dc.init("sim")


def test_auto_picks_sim_without_gpu():
    if dc.testing.gpu_count():
        pytest.skip("this machine has GPUs: auto picks a GPU backend")
    res = dc.testing.launch(launch_rankfns.init_report, 2, "auto", backend=None)
    for r, (status, name, reason, device, rank, size) in enumerate(res):
        assert (status, name, device, rank, size) == ("ok", "sim", "cpu", r, 2)
        assert reason.startswith("auto:") and "cuda_ipc: rank 0:" in reason


def test_auto_says_which_backend_it_took():
    if dc.testing.gpu_count():
        pytest.skip("this machine has GPUs: auto picks a GPU backend")
    res = dc.testing.launch(launch_rankfns.init_logged, 2, "auto", backend=None)
    for r, (name, records) in enumerate(res):
        assert name == "sim"
        said = [m for m in records if "uses backend" in m]
        assert len(said) == 1 and f"rank {r}/2 uses backend 'sim' (auto:" in said[0], records


def test_explicit_sim():
    res = dc.testing.launch(launch_rankfns.init_report, 2, "sim", backend=None)
    assert [r[:3] for r in res] == [("ok", "sim", "requested")] * 2


def test_default_group_and_sub_group(seed):
    res = dc.testing.launch(launch_rankfns.default_and_sub_group, 3, 5, seed, backend=None, timeout=180)
    assert [r[0] for r in res] == [(0, 3), (1, 3), (2, 3)]  # group=None: the world
    assert [r[1] for r in res] == [None, (0, 2), (1, 2)]    # ranks 1, 2 of the world as a group of 2
    assert res[0][2] is None and res[1][2] > 0 and res[2][2] > 0


def test_env_overrides_argument(monkeypatch):
    monkeypatch.setenv("DWDP_COMM_BACKEND", "sim")
    res = dc.testing.launch(launch_rankfns.init_report, 2, "cuda_ipc", backend=None)
    assert [r[:2] for r in res] == [("ok", "sim")] * 2


@pytest.mark.parametrize("backend", ["cuda_ipc", "nvshmem"])
def test_unavailable_backend_fails_on_every_rank(backend):
    if dc.backends.probe(backend) is None:
        pytest.skip(f"{backend} is available here")
    res = dc.testing.launch(launch_rankfns.init_report, 2, backend, backend=None)
    for status, cls, msg in res:
        assert (status, cls) == ("error", "BackendUnavailableError")
        assert f"backend {backend!r} is unavailable" in msg and "rank 0:" in msg and "rank 1:" in msg
        assert "'sim'" in msg  # suggests an alternative


def test_launch_returns_in_rank_order():
    assert dc.testing.launch(launch_rankfns.rank_and_size, 3) == [(0, 3), (1, 3), (2, 3)]


def test_launch_spawns_over_gloo(monkeypatch):
    monkeypatch.setattr(launch_rankfns, "MARK", "changed in the parent")
    res = dc.testing.launch(launch_rankfns.launch_facts, 2)
    for r, (rank, size, pg_backend, mark, proc) in enumerate(res):
        assert (rank, size, pg_backend, proc) == (r, 2, "gloo", f"dwdp-rank{r}")
        assert mark == "module", "the child saw the parent's memory: it was forked, not spawned"


@pytest.mark.parametrize("others", ["barrier", "sleep"])
def test_launch_reraises_tagged_with_rank(others):
    t0 = time.monotonic()
    with pytest.raises(dc.RankFailedError) as ei:
        dc.testing.launch(launch_rankfns.raise_on_rank, 3, 1, others, timeout=90)
    assert time.monotonic() - t0 < 45  # the ranks blocked in the barrier were killed, not waited for
    err = ei.value
    assert err.rank == 1 and isinstance(err.__cause__, ValueError)
    assert "rank 1 raised ValueError: boom on rank 1" in str(err) and "raise_on_rank" in err.remote_traceback


def test_launch_kills_the_rest_when_a_rank_dies():
    t0 = time.monotonic()
    with pytest.raises(dc.RankFailedError, match="rank 2 died") as ei:
        dc.testing.launch(launch_rankfns.die_on_rank, 3, 2, timeout=90)
    assert ei.value.rank == 2
    assert time.monotonic() - t0 < 60  # not the 90 s timeout


def test_launch_timeout_kills_everyone():
    with pytest.raises(dc.RankFailedError, match="timeout after 8 s"):
        dc.testing.launch(launch_rankfns.sleep_forever, 2, timeout=8)


def test_launch_is_a_public_module():
    """The launcher is library code (the CLI uses it): dwdp_comm.launch; testing re-exports it."""
    from dwdp_comm.launch import gpu_count, launch
    assert dc.testing.launch is launch and dc.testing.gpu_count is gpu_count
    assert launch.__module__ == "dwdp_comm.launch"


def test_launch_timeout_names_unfinished_and_finished_ranks():
    with pytest.raises(dc.RankFailedError) as ei:
        dc.testing.launch(fault_cases.finish_or_sleep, 3, [2], timeout=20)  # ranks 0, 1 finish in ~3 s; margin for a loaded machine
    err = ei.value
    assert err.rank is None and err.unfinished == [2] and err.finished == [0, 1] and err.failed == {}, vars(err)
    msg = str(err)
    assert msg.startswith("timeout after 20 s") and "rank(s) [2] had not finished" in msg, msg
    assert "rank(s) [0, 1] had finished" in msg, msg


def test_launch_failure_lists_every_failed_and_unfinished_rank():
    with pytest.raises(dc.RankFailedError) as ei:
        dc.testing.launch(launch_rankfns.fail_some, 3, 1, 2, timeout=90)
    err = ei.value
    assert err.rank == 1 and isinstance(err.__cause__, ValueError)
    assert sorted(err.failed) == [1, 2] and err.unfinished == [0], vars(err)
    assert "RuntimeError: later failure on rank 2" in err.failed[2]
    msg = str(err).split("--- traceback")[0]
    assert "rank 1 raised ValueError: first failure on rank 1" in msg
    assert "rank 2: RuntimeError: later failure on rank 2" in msg and "rank(s) [0] had not finished" in msg, msg


def test_no_private_torch_distributed_api():
    """The library reaches torch.distributed through public names only (the arrival board used
    torch's private _get_default_store)."""
    root = os.path.dirname(dc.__file__)
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                text = open(os.path.join(dirpath, f)).read()
                assert "distributed_c10d._" not in text and "_get_default_store" not in text, f


def test_explicit_store_names_the_missing_rank():
    res = dc.testing.launch(launch_rankfns.board_report, 3, "tcp", 2, 6.0, backend=None, timeout=90)
    for r in res[:2]:
        assert r["type"] == "CollectiveTimeoutError" and r["missing"] == [2], r
        assert "rank(s) [2] had not arrived" in r["msg"] and r["board_keys"] > 0, r


def test_without_a_store_missing_ranks_are_unknown():
    res = dc.testing.launch(launch_rankfns.board_report, 2, "none", 1, 6.0, backend=None, timeout=90)
    r = res[0]
    assert r["type"] == "CollectiveTimeoutError" and r["missing"] is None, r
    assert "which ranks arrived is unknown" in r["msg"], r


def test_store_argument_is_checked():
    for r in dc.testing.launch(launch_rankfns.store_type_error, 2, backend=None):
        assert r["type"] == "InvalidTypeError" and r["msg"].startswith("store: got an object of type str"), r


def test_launch_bad_arguments():
    with pytest.raises(dc.InvalidArgumentError, match="world_size: got 0"):
        dc.testing.launch(launch_rankfns.rank_and_size, 0)

import time

import pytest

import dwdp_comm as dc
import rankfns


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
    res = dc.testing.launch(rankfns.init_report, 2, "auto", backend=None)
    for r, (status, name, reason, device, rank, size) in enumerate(res):
        assert (status, name, device, rank, size) == ("ok", "sim", "cpu", r, 2)
        assert reason.startswith("auto:") and "cuda_ipc: rank 0:" in reason


def test_env_overrides_argument(monkeypatch):
    monkeypatch.setenv("DWDP_COMM_BACKEND", "sim")
    res = dc.testing.launch(rankfns.init_report, 2, "cuda_ipc", backend=None)
    assert [r[:2] for r in res] == [("ok", "sim")] * 2


def test_unavailable_backend_fails_on_every_rank():
    if dc.testing.gpu_count():
        pytest.skip("cuda_ipc may be available here")
    res = dc.testing.launch(rankfns.init_report, 2, "cuda_ipc", backend=None)
    for status, cls, msg in res:
        assert (status, cls) == ("error", "BackendUnavailableError")
        assert "backend 'cuda_ipc' is unavailable" in msg and "rank 0:" in msg and "rank 1:" in msg
        assert "'sim'" in msg  # suggests an alternative


def test_launch_returns_in_rank_order():
    assert dc.testing.launch(rankfns.rank_and_size, 3) == [(0, 3), (1, 3), (2, 3)]


def test_launch_reraises_tagged_with_rank():
    with pytest.raises(dc.RankFailedError) as ei:
        dc.testing.launch(rankfns.raise_on_rank, 3, 1, timeout=60)
    err = ei.value
    assert err.rank == 1 and isinstance(err.__cause__, ValueError)
    assert "rank 1 raised ValueError: boom on rank 1" in str(err) and "raise_on_rank" in err.remote_traceback


def test_launch_kills_the_rest_when_a_rank_dies():
    t0 = time.monotonic()
    with pytest.raises(dc.RankFailedError, match="rank 2 died") as ei:
        dc.testing.launch(rankfns.die_on_rank, 3, 2, timeout=90)
    assert ei.value.rank == 2
    assert time.monotonic() - t0 < 60  # not the 90 s timeout


def test_launch_timeout_kills_everyone():
    with pytest.raises(dc.RankFailedError, match="timeout after 8 s"):
        dc.testing.launch(rankfns.sleep_forever, 2, timeout=8)


def test_launch_bad_arguments():
    with pytest.raises(dc.InvalidArgumentError, match="world_size: got 0"):
        dc.testing.launch(rankfns.rank_and_size, 0)

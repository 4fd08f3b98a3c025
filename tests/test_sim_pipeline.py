"""End-to-end DWDP pipeline on the sim backend: several processes, real shared memory, a copy thread."""
import pytest

import dwdp_comm as dc
import rankfns


@pytest.mark.parametrize("world_size, num_experts, schedule", [
    (2, 7, "round_robin"),
    (3, 10, "rotated"),
    (4, 11, "naive"),
    (4, 14, "round_robin"),
])
def test_pipeline_every_byte(world_size, num_experts, schedule, seed):
    assert num_experts % world_size  # uneven shards on purpose
    res = dc.testing.launch(rankfns.pipeline, world_size, num_experts, 5, 2, schedule, 3000, seed, timeout=180)
    for r in res:
        # float32 4 KiB experts map zero-copy; the others gather (local experts copied in too)
        assert r["modes"] == {"w13": "composite", "w2": "gather", "w13_scale": "gather"}
        assert r["checked"] > 0
        hits, misses, nbytes = r["plan_cache"]
        assert misses == 1 and hits == 4  # five layers of one shape share one plan
        assert nbytes >= r["remote"]  # remote bytes, plus local copies of gather-mode names


def test_depth_one_and_three(seed):
    for depth in (1, 3):
        res = dc.testing.launch(rankfns.pipeline, 3, 8, 4, depth, "round_robin", 1 << 20, seed, timeout=180)
        assert all(r["checked"] for r in res)


def test_partial_prefetch(seed):
    res = dc.testing.launch(rankfns.partial, 3, 9, seed)
    for r in res:
        assert "absent experts" in r["absent_error"] and r["absent_error"].startswith("experts:")
        assert r["default_error"].startswith("experts:")


def test_slot_not_overwritten_while_held(seed):
    res = dc.testing.launch(rankfns.slot_held, 2, 5, seed)
    for r in res:
        assert r["deferred"] == (True, True)
        assert "still held by the handle of layer 0" in r["wait_error"]
        assert r["cancelled_ok"]


def test_prefetch_is_asynchronous(seed):
    # 200 KB/s: the ~10 KB a rank pulls takes tens of ms, prefetch() must return long before.
    res = dc.testing.launch(rankfns.slow_copies, 2, 4, seed, options={"copy_bandwidth": 2e5})
    for r in res:
        assert r["ok"]
        assert not r["done_at_issue"]
        assert r["t_issue"] < r["t_done"]

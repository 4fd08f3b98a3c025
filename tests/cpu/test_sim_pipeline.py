"""End-to-end DWDP pipeline on the sim backend: several processes, real shared memory, a copy thread."""
import pytest

import dwdp_comm as dc
from tests.helpers import prefetch_rankfns


@pytest.mark.parametrize("world_size, num_experts, schedule", [
    (2, 7, "round_robin"),
    (3, 10, "rotated"),
    (4, 11, "naive"),
    (4, 14, "round_robin"),
])
def test_pipeline_every_byte(world_size, num_experts, schedule, seed):
    assert num_experts % world_size  # uneven shards on purpose
    res = dc.testing.launch(prefetch_rankfns.pipeline, world_size, num_experts, 5, 2, schedule, 3000, seed, timeout=180)
    for r in res:
        # float32 4 KiB experts map zero-copy; the others gather (local experts copied in too)
        assert r["modes"] == {"w13": "composite", "w2": "gather", "w13_scale": "gather"}
        assert r["checked"] > 0
        hits, misses, nbytes = r["plan_cache"]
        assert misses == 1 and hits == 4  # five layers of one shape share one plan
        assert nbytes >= r["remote"]  # remote bytes, plus local copies of gather-mode names


def test_depth_one_and_three(seed):
    for depth in (1, 3):
        res = dc.testing.launch(prefetch_rankfns.pipeline, 3, 8, 4, depth, "round_robin", 1 << 20, seed, timeout=180)
        assert all(r["checked"] for r in res)


def test_partial_prefetch(seed):
    res = dc.testing.launch(prefetch_rankfns.partial, 3, 9, seed)
    for r in res:
        assert "absent experts" in r["absent_error"] and r["absent_error"].startswith("experts:")
        assert r["default_error"].startswith("experts:")
        # partial(0), full(1), then the same partial set for layer 1: planned twice, reused once
        assert r["plan_cache"] == (1, 2)


def test_default_depth_is_two(seed):
    res = dc.testing.launch(prefetch_rankfns.default_depth, 3, 7, seed)
    for r in res:
        assert r["depth"] == 2 and r["slots"] == [0, 1, 0]
        assert r["submitted"] == [True, True, False]  # the third waits for slot 0's release
        assert r["submitted_after_release"]


def test_custom_policy_drives_the_prefetcher(seed):
    res = dc.testing.launch(prefetch_rankfns.custom_policy, 3, 8, seed)
    for rank, r in enumerate(res):
        assert r["policy"] == "test_descending"
        assert r["sources"] == sorted((s for s in range(3) if s != rank), reverse=True)


def test_sim_engine_gates_then_copies_in_plan_order():
    # 50 KB/s, 2 KiB chunks: ~40 ms per copy, 8 copies per rank; progress is observable.
    res = dc.testing.launch(prefetch_rankfns.engine_order, 3, 2048, options={"copy_bandwidth": 5e4})
    for r in res:
        assert r["copy_thread"], "no live copy thread for this rank"
        assert r["gated"] == (True, True), "the job started before its `after` event completed"
        assert r["prefix"], "copies landed out of plan order"
        assert r["final"], "the completion event fired before every byte landed"
        assert r["distinct"] > 3, "no intermediate progress observed: the copy was not chunk by chunk"


def test_slot_not_overwritten_while_held(seed):
    res = dc.testing.launch(prefetch_rankfns.slot_held, 2, 5, seed)
    for r in res:
        assert r["deferred"] == (True, True)
        assert "still held by the handle of layer 0" in r["wait_error"]
        assert r["cancelled_ok"]


def test_prefetch_is_asynchronous(seed):
    # 50 KB/s: the ~9 KB a rank copies takes ~180 ms; prefetch() must return long before.
    res = dc.testing.launch(prefetch_rankfns.slow_copies, 2, 4, seed, options={"copy_bandwidth": 5e4})
    for r in res:
        assert r["ok"]
        # prefetch() returned while the copies were still running (a synchronous copy would be done);
        # the lower bound on t_done shows the throttle really held the copies back.
        assert not r["done_at_issue"], r
        assert r["t_done"] > 0.15, r


def test_close_releases_the_engine_before_waiting(seed):
    """A sync engine's copies can wait for a peer's job that never comes, until its (collective)
    close releases them: Prefetcher.close() must close the engine before it waits on handles."""
    res = dc.testing.launch(prefetch_rankfns.close_releases_engine_first, 2, 6, seed, timeout=60)
    for r in res:
        assert r["error"] is None, r["error"]
        assert r["released"] and r["handle_done"]
        assert r["closed_twice"] is None  # a second close() is a no-op

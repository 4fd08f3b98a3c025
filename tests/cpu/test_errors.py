"""Every documented misuse gives a clear error; collective mismatches are reported on every rank."""
import pytest

import dwdp_comm as dc
from tests.helpers import usage_rankfns

CASES = {
    "duplicate": ("InvalidArgumentError", "name: got 'w'"),
    "bad_layer": ("InvalidArgumentError", "layer: got -1"),
    "bad_name": ("InvalidArgumentError", "name: got ''"),
    "bad_shard": ("InvalidTypeError", "shard: got an object of type float"),
    "scalar_shard": ("InvalidArgumentError", "shard:"),
    "prefetcher_before_commit": ("DwdpError", "not committed"),
    "register_after_commit": ("DwdpError", "after commit()"),
    "commit_twice": ("DwdpError", "commit() called twice"),
    "depth0": ("InvalidArgumentError", "depth: got 0, expected an int >= 1"),
    "chunk0": ("InvalidArgumentError", "chunk_nbytes: got 0"),
    "chunk_neg": ("InvalidArgumentError", "chunk_nbytes: got -5"),
    "schedule": ("InvalidArgumentError", "schedule: got 'fastest'"),
    "unregistered_layer": ("InvalidArgumentError", "layer: got 7, expected a registered layer, one of [0]"),
    "bad_experts": ("InvalidArgumentError", "experts: got 99"),
    "weights_before_wait": ("DwdpError", "before wait()"),
    "unregistered_name": ("InvalidArgumentError", "name: got 'nope', expected a name registered for layer 0"),
    "weights_after_release": ("DwdpError", "after release()"),
    "release_twice": ("DwdpError", "released twice"),
    "prefetch_after_close": ("ClosedError", "after close()"),
    "store_after_close": ("ClosedError", "after close()"),
    "prefetcher_on_closed_store": ("ClosedError", "after close()"),
    "store_on_closed_group": ("ClosedError", "after close()"),
}


NO_OPS = ("close_twice", "store_close_twice", "group_close_twice")  # a second close() does nothing


def test_usage_errors(seed):
    res = dc.testing.launch(usage_rankfns.usage_errors, 2, seed)
    for rank_result in res:
        assert set(rank_result) == set(CASES) | set(NO_OPS)
        for case in NO_OPS:
            assert rank_result[case] is None, f"{case}: {rank_result[case]}"
        for case, (cls, text) in CASES.items():
            got = rank_result[case]
            assert got is not None, f"{case}: no error raised"
            assert got[0] == cls and text in got[1], f"{case}: {got}"


def test_error_classes():
    assert issubclass(dc.InvalidArgumentError, ValueError) and issubclass(dc.InvalidArgumentError, dc.DwdpError)
    assert issubclass(dc.InvalidTypeError, TypeError)


@pytest.mark.parametrize("case, text", [
    ("dtype", "layer 0, name 'w': dtypes differ: rank 0: float32, rank 1: float32, rank 2: float16"),
    ("shape", "layer 0, name 'w': per-expert shapes differ"),
    ("missing_name", "layer 0, name 'scale': not registered on rank(s) [2]"),
    ("missing_layer", "layer 5: not registered on rank(s) [0, 1]"),
    ("shard_size", "layer 0, name 'w', rank 2: shard has 3 experts, expected 2 (rank 2 owns experts 5..6)"),
    ("nothing", "no tensors registered on any rank"),
])
def test_commit_mismatch_on_every_rank(case, text):
    res = dc.testing.launch(usage_rankfns.mismatched_commit, 3, case)
    assert all(r is not None for r in res), res
    assert len(set(res)) == 1  # the same message on every rank
    assert text in res[0], res[0]


def test_rank_failed_error_records_every_rank():
    err = dc.RankFailedError("rank 1 raised ...", rank=1, failed={1: "ValueError: x"}, finished=[0], unfinished=[2])
    assert (err.rank, err.failed, err.finished, err.unfinished) == (1, {1: "ValueError: x"}, [0], [2])
    bare = dc.RankFailedError("timeout")
    assert (bare.rank, bare.failed, bare.finished, bare.unfinished, bare.remote_traceback) == (None, {}, [], [], "")

"""Comm, the object exchange under every collective step: agreed_error returns one answer on every
rank (what a benchmark records for a copy engine some rank could not create).

The exchange itself (all_gather_object over gloo, its timeouts and mismatch checks) runs in every
launched test; here each rank's view of one exchange is given, so every case runs in this process.
"""
import pytest

from dwdp_comm.comm import Comm


class _Gathered(Comm):
    """A Comm whose exchange returns ``everyone`` (what every rank's all_gather_object returns)."""

    def __init__(self, rank, everyone):
        super().__init__(pg=None, rank=rank, size=len(everyone))
        self.everyone = everyone

    def all_gather_object(self, obj, step="object exchange"):
        assert obj == self.everyone[self.rank] and step == "creating an engine"
        return list(self.everyone)


@pytest.mark.parametrize("everyone, want", [
    ([None, None, None], None),
    ([None, "no memory", "no memory"], "no memory"),
    (["a", None, "b"], "rank 0: a; rank 2: b"),
])
def test_agreed_error_is_the_same_on_every_rank(everyone, want):
    assert [_Gathered(r, everyone).agreed_error(everyone[r], "creating an engine")
            for r in range(len(everyone))] == [want] * len(everyone)

"""Placement is owned by the store: WeightStore.slot_view says which view a prefetch slot gives."""
import pytest

import dwdp_comm as dc
from tests.helpers import rankfns


@pytest.mark.parametrize("world_size, num_experts", [(2, 6), (3, 8)])
def test_slot_view_matches_the_prefetched_views(world_size, num_experts, seed):
    res = dc.testing.launch(rankfns.slot_views, world_size, num_experts, seed, timeout=120)
    assert all(set(r.values()) == {"composite", "gather"} for r in res)

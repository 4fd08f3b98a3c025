"""Placement is owned by the store: WeightStore.slot_view says which view a prefetch slot gives."""
import pytest
import torch

import dwdp_comm as dc
from tests.helpers import prefetch_rankfns, stores


@pytest.mark.parametrize("world_size, num_experts", [(2, 6), (3, 8)])
def test_slot_view_matches_the_prefetched_views(world_size, num_experts, seed):
    res = dc.testing.launch(prefetch_rankfns.slot_views, world_size, num_experts, seed, timeout=120)
    assert all(set(r.values()) == {"composite", "gather"} for r in res)


# Half-page experts (2 KiB on sim's 4 KiB pages): the old rule (every expert a page multiple) put
# them in gather mode; what a composite view needs is that each rank's block of experts starts and
# ends on a page. 8 experts on 2 or 4 ranks: blocks of 4 or 2 (8 or 4 KiB): composite. On 3 ranks:
# blocks of 3, 3, 2 experts (6 KiB ends off a page): gather. As Qwen3-30B-A3B's 3 MiB down_proj
# experts on 2 MiB GPU pages (64 a rank: 192 MiB).
HALF_PAGE = {"half": ((16, 32), torch.float32), "w2": stores.SPECS["w2"]}


@pytest.mark.parametrize("world_size, num_experts, want", [(2, 8, "composite"), (3, 8, "gather"), (4, 8, "composite"),
                                                           (2, 16, "composite")])
def test_blocks_on_page_boundaries_map_zero_copy(world_size, num_experts, want, seed):
    res = dc.testing.launch(prefetch_rankfns.slot_views, world_size, num_experts, seed, HALF_PAGE, timeout=120)
    assert [r["half"] for r in res] == [want] * world_size
    assert all(r["w2"] == "gather" for r in res)  # 192-byte experts: no block of them ends on a page

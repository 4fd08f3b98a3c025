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


def _placement(mode, local, num_experts=10, nbytes_shape=(4,)):
    spec = dc.TensorSpec("w", torch.float32, nbytes_shape)
    return dc.Placement(spec, mode, heap_offset=1 << 20, slot_offset=4096, num_experts=num_experts,
                        local_experts=local)


def test_placement_slot_rows_and_view_composite():
    """Composite: the slot holds the remote experts in global order with this rank's block left
    out; the view maps [slot before | heap block | slot after] back to back."""
    p = _placement("composite", range(3, 6))
    assert [p.slot_row(e) for e in (0, 1, 2, 6, 7, 8, 9)] == [0, 1, 2, 3, 4, 5, 6]
    for e in (3, 4, 5):
        with pytest.raises(dc.InvalidArgumentError, match="^expert: got"):
            p.slot_row(e)
    for bad in (-1, 10):
        with pytest.raises(dc.InvalidArgumentError, match="^expert: got"):
            p.slot_row(bad)
    with pytest.raises(dc.InvalidTypeError):
        p.slot_row(1.0)
    v = p.view()
    nb = 16
    assert v.mode == "composite" and v.num_experts == 10 and v.spec is p.spec
    assert [(x.first, x.count, x.source, x.offset, x.nbytes) for x in v.pieces] == [
        (0, 3, "slot", 4096, 3 * nb), (3, 3, "heap", 1 << 20, 3 * nb), (6, 4, "slot", 4096 + 3 * nb, 4 * nb)]


def test_placement_edges_and_gather():
    first = _placement("composite", range(0, 4)).view()
    assert [x.source for x in first.pieces] == ["heap", "slot"]  # empty pieces are left out
    last = _placement("composite", range(7, 10)).view()
    assert [x.source for x in last.pieces] == ["slot", "heap"]
    g = _placement("gather", range(3, 6))
    assert [g.slot_row(e) for e in range(10)] == list(range(10))  # every expert is in the slot
    assert [(x.first, x.count, x.source, x.offset) for x in g.view().pieces] == [(0, 10, "slot", 4096)]
    raw = torch.arange(10 * 4, dtype=torch.float32).view(torch.uint8)
    assert torch.equal(g.view().typed(raw), torch.arange(40, dtype=torch.float32).view(10, 4))

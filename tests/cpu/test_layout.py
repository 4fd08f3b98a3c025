import pytest
from hypothesis import given, strategies as st

from dwdp_comm import ExpertLayout, InvalidArgumentError


@given(st.integers(1, 64), st.integers(1, 300))
def test_round_trip(group_size, extra):
    num_experts = group_size + extra - 1
    layouts = [ExpertLayout(num_experts, group_size, r) for r in range(group_size)]
    sizes = [l.num_local_experts for l in layouts]
    assert sum(sizes) == num_experts
    assert max(sizes) - min(sizes) <= 1
    base, extra = divmod(num_experts, group_size)
    assert sizes == [base + (r < extra) for r in range(group_size)]  # the documented rule
    assert max(sizes) == layouts[0].max_local_experts
    seen = []
    for r, lay in enumerate(layouts):
        assert list(lay.local_experts) == list(lay.experts_of(r))
        for i, e in enumerate(lay.local_experts):
            assert lay.owner(e) == r and lay.local_index(e) == i
            assert lay.global_expert(r, i) == e and lay.is_local(e)
            seen.append(e)
        assert sorted(lay.remote_experts + list(lay.local_experts)) == list(range(num_experts))
    assert seen == list(range(num_experts))  # contiguous blocks in rank order


def test_documented_example():
    lay = ExpertLayout(10, 4, 2)
    assert [list(lay.experts_of(r)) for r in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert lay.local_experts == range(6, 8) and lay.owner(9) == 3 and lay.local_index(9) == 1


@pytest.mark.parametrize("kwargs, arg", [
    (dict(num_experts=3, group_size=4, rank=0), "num_experts"),
    (dict(num_experts=0, group_size=1, rank=0), "num_experts"),
    (dict(num_experts=8, group_size=0, rank=0), "group_size"),
    (dict(num_experts=8, group_size=4, rank=4), "rank"),
    (dict(num_experts=8, group_size=4, rank=-1), "rank"),
])
def test_bad_arguments(kwargs, arg):
    with pytest.raises(InvalidArgumentError) as ei:
        ExpertLayout(**kwargs)
    assert str(ei.value).startswith(arg + ":") and "expected" in str(ei.value)


def test_bad_queries():
    lay = ExpertLayout(8, 4, 1)
    with pytest.raises(ValueError, match="expert: got 8"):
        lay.owner(8)
    with pytest.raises(TypeError, match="expert"):
        lay.owner(1.5)
    with pytest.raises(ValueError, match="local_index"):
        lay.global_expert(0, 2)
    with pytest.raises(ValueError, match="rank"):
        lay.experts_of(4)

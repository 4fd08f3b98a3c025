"""Routing histograms: the device counter against torch.bincount on fresh random ids, the JSON form
(round trip, merge, a telemetry document holding one) and its validation errors."""

import json

import pytest
import torch

import dwdp_comm as dc
from dwdp_comm.routing_histogram import FORMAT, RoutingCounter, RoutingHistogram, load


def test_counter_matches_bincount_and_drops_out_of_range(seed):
    g = torch.Generator().manual_seed(seed)
    E = 11
    c = RoutingCounter(E)
    want = {3: torch.zeros(E, dtype=torch.int64), 7: torch.zeros(E, dtype=torch.int64)}
    tokens = {3: 0, 7: 0}
    for step in range(6):
        layer = 3 if step % 2 else 7
        ids = torch.randint(-2, E + 2, (int(torch.randint(0, 40, (1,), generator=g)), 4), generator=g)
        ids = ids.to(torch.int32 if step % 3 == 0 else torch.int64)
        c.add(layer, ids)
        valid = ids[(ids >= 0) & (ids < E)].long()
        want[layer] += torch.bincount(valid, minlength=E)
        tokens[layer] += ids.shape[0]
    h = c.histogram(ranks=[2])
    assert h.top_k == 4 and h.ranks == (2,) and h.num_experts == E
    assert h.layers == {l: {"tokens": tokens[l], "counts": want[l].tolist()} for l in (3, 7)}
    assert h.total() == (want[3] + want[7]).tolist() and h.total(layer=3) == want[3].tolist()
    c.reset()
    assert c.histogram().layers == {}


def test_counter_rejects_bad_ids():
    c = RoutingCounter(4)
    for bad in (torch.zeros(3, dtype=torch.int64), torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.bool),
                torch.zeros(1, 2, 3, dtype=torch.int64)):
        with pytest.raises(dc.InvalidArgumentError, match="^expert_ids: "):
            c.add(0, bad)
    with pytest.raises(dc.InvalidTypeError, match="^expert_ids: "):
        c.add(0, [[1, 2]])
    with pytest.raises(dc.InvalidArgumentError, match="^num_experts: "):
        RoutingCounter(0)
    with pytest.raises(dc.InvalidTypeError, match="^num_experts: "):
        RoutingCounter(True)


def test_json_round_trip_merge_and_telemetry_document(tmp_path):
    a = RoutingHistogram(3, {0: {"tokens": 2, "counts": [1, 0, 3]}, "5": {"tokens": 1, "counts": [0, 2, 0]}},
                         top_k=2, ranks=[0])
    b = RoutingHistogram(3, {0: {"tokens": 4, "counts": [2, 2, 4]}}, top_k=2, ranks=[1])
    path = tmp_path / "h.json"
    a.save(path)
    doc = json.loads(path.read_text())
    assert doc == {"format": FORMAT, "version": 1, "num_experts": 3, "top_k": 2, "ranks": [0],
                   "layers": {"0": {"tokens": 2, "counts": [1, 0, 3]}, "5": {"tokens": 1, "counts": [0, 2, 0]}}}
    assert load(path) == a and load(doc) == a
    assert load({"format": "dwdp-telemetry", "routing": doc}) == a  # a telemetry file holding one
    m = RoutingHistogram.merge([a, b])
    assert m.ranks == (0, 1) and m.top_k == 2
    assert m.layers == {0: {"tokens": 6, "counts": [3, 2, 7]}, 5: {"tokens": 1, "counts": [0, 2, 0]}}
    assert m.total() == [3, 4, 7]


@pytest.mark.parametrize("doc, field", [
    ({"format": "other"}, "format"),
    ({"format": FORMAT, "version": 2, "num_experts": 2, "layers": {}}, "version"),
    ({"format": FORMAT, "version": 1, "layers": {}}, "num_experts"),
    ({"format": FORMAT, "version": 1, "num_experts": 2, "layers": {"0": {"tokens": 1, "counts": [1]}}},
     r"layers\[0\]\.counts"),
    ({"format": FORMAT, "version": 1, "num_experts": 2, "layers": {"0": {"tokens": 1, "counts": [1, -1]}}},
     r"layers\[0\]\.counts"),
    ({"format": FORMAT, "version": 1, "num_experts": 2, "layers": {"x": {"tokens": 1, "counts": [1, 1]}}},
     "layers"),
    ({"format": FORMAT, "version": 1, "num_experts": 2, "layers": {"0": {"counts": [1, 1]}}}, r"layers\[0\]"),
    ({"format": FORMAT, "version": 1, "num_experts": 2, "top_k": 0, "layers": {}}, "top_k"),
    ({"format": FORMAT, "version": 1, "num_experts": 2, "layers": {"0": {"tokens": -1, "counts": [1, 1]}}},
     r"layers\[0\]\.tokens"),
])
def test_load_names_the_bad_field(doc, field):
    with pytest.raises(dc.InvalidArgumentError, match=f"^{field}: "):
        load(doc)


@pytest.mark.parametrize("doc, field", [
    ({"format": FORMAT, "version": 1, "num_experts": 2.0, "layers": {}}, "num_experts"),
    ({"format": FORMAT, "version": 1, "num_experts": 2, "layers": {"0": {"tokens": 1, "counts": [1, 0.5]}}},
     r"layers\[0\]\.counts"),
])
def test_load_names_a_field_of_the_wrong_type(doc, field):
    with pytest.raises(dc.InvalidTypeError, match=f"^{field}: "):
        load(doc)


def test_load_errors_for_files_and_merge(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(dc.InvalidArgumentError, match="^source: "):
        load(bad)
    with pytest.raises(dc.InvalidTypeError, match="^source: "):
        load(3)
    with pytest.raises(dc.InvalidArgumentError, match="^hists: "):
        RoutingHistogram.merge([RoutingHistogram(2, {}), RoutingHistogram(3, {})])

"""advise's third answer: replicate only the hottest experts, from a routing histogram.

The histogram's forms (the telemetry's JSON, plain JSON, CSV), the hybrid's layer formula against
DEP's, its memory checked by hand, and the answer on a skewed (Zipf) and a flat histogram.
"""

import json
import random

import pytest

from dwdp_comm.bench import advise as A
from dwdp_comm.bench import fabric as F
from dwdp_comm.bench.advise import hot as HOT
from dwdp_comm.bench.advise.routing import RoutingHistogram, load_routing
from dwdp_comm.bench.cli import main
from dwdp_comm.errors import InvalidArgumentError

TINY_GQA = dict(name="tiny-gqa", hidden=64, moe_intermediate=32, num_experts=8, top_k=2, num_layers=2,
                attention="gqa", num_heads=4, num_kv_heads=2, head_dim=16)


@pytest.fixture(autouse=True)
def _no_gpu_name(monkeypatch):
    monkeypatch.setattr(F, "local_gpu_name", lambda: None)  # the fabric is h200 here, on any machine


def zipf_counts(num_experts: int, s: float, rows: int, seed: int) -> list[int]:
    """Counts falling as 1 / rank^s over the experts, the ranks shuffled over expert ids (seeded)."""
    ids = list(range(num_experts))
    random.Random(seed).shuffle(ids)
    w = [1 / (i + 1) ** s for i in range(num_experts)]
    c = [0] * num_experts
    for i, e in enumerate(ids):
        c[e] = round(rows * w[i] / sum(w))
    return c


# ---- reading a histogram ----------------------------------------------------------------------------------------
TELEMETRY = {"format": "dwdp-routing-histogram", "version": 1, "num_experts": 4, "top_k": 2, "ranks": [0, 1],
             "layers": {"3": {"tokens": 10, "counts": [5, 5, 6, 4]}, "4": {"tokens": 10, "counts": [20, 0, 0, 0]}}}


def test_routing_telemetry_form_alone_and_in_a_telemetry_file(tmp_path):
    h = load_routing(TELEMETRY)
    assert (h.num_experts, h.top_k, h.layers) == (4, 2, {3: (5, 5, 6, 4), 4: (20, 0, 0, 0)})
    p = tmp_path / "telemetry.json"
    p.write_text(json.dumps({"per_rank": [], "routing": TELEMETRY}))
    assert load_routing(str(p)).layers == h.layers and load_routing(str(p)).source == "telemetry.json"
    assert h.shares(4) == [1.0, 0.0, 0.0, 0.0] and h.total() == [25, 5, 6, 4]


def test_routing_plain_json_and_csv_forms(tmp_path):
    assert load_routing({"layers": {"0": [1, 2]}, "top_k": 1}).top_k == 1
    assert load_routing({"7": [1, 2], "9": [3, 4]}).layers == {7: (1, 2), 9: (3, 4)}
    assert load_routing([[1, 2], [3, 4]]).layers == {0: (1, 2), 1: (3, 4)}
    assert load_routing([1, 2, 3]).layers == {0: (1, 2, 3)}
    long = tmp_path / "long.csv"
    long.write_text("layer,expert,count\n0,0,5\n0,3,7\n1,1,2\n1,1,1\n")
    h = load_routing(str(long))
    assert h.sparse and h.layers == {0: (5, 0, 0, 7), 1: (0, 3, 0, 0)}  # repeated rows add up
    assert h.padded(6).layers[1] == (0, 3, 0, 0, 0, 0)  # experts never listed count 0
    wide = tmp_path / "wide.csv"
    wide.write_text("layer,e0,e1,e2\n0,1,2,3\n5,3,3,3\n")
    assert load_routing(str(wide)).layers == {0: (1, 2, 3), 5: (3, 3, 3)}
    (tmp_path / "bare.csv").write_text("2,1,1\n")
    assert load_routing(str(tmp_path / "bare.csv")).layers == {2: (1, 1)}


@pytest.mark.parametrize("doc,match", [
    ({**TELEMETRY, "version": 2}, "routing version: got 2"),
    ({**TELEMETRY, "format": "other"}, "routing format: got 'other'"),
    ({**TELEMETRY, "layers": {"3": {"counts": [1, 2]}}}, r"counts: got '2 counts', expected 4"),
    ({"layers": {"0": [1, -1]}}, "counts that are ints >= 0"),
    ({"layers": {"0": [1, 2], "1": [1, 2, 3]}}, "expected 2"),
    ({"layers": {"x": [1]}}, "an integer layer id"),
    ([0, 0], "at least one routed row"),
])
def test_routing_errors_name_the_field(doc, match):
    with pytest.raises(InvalidArgumentError, match=match):
        load_routing(doc)


def test_routing_file_errors(tmp_path):
    with pytest.raises(InvalidArgumentError, match="readable routing histogram"):
        load_routing(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.csv"
    bad.write_text("layer,expert,count\n0,x,3\n")
    with pytest.raises(InvalidArgumentError, match="CSV line 2"):
        load_routing(str(bad))
    with pytest.raises(InvalidArgumentError, match="the model's num_experts"):
        RoutingHistogram(4, {0: (1, 2, 3, 4)}).padded(8)  # not sparse: a different model


# ---- the model ----------------------------------------------------------------------------------------------------
HAND = {"layers": {"0": [50, 1, 1, 1, 40, 1, 1, 5]}}  # 8 experts; owners on 4 ranks: [0,1] [2,3] [4,5] [6,7]


def test_hot_layers_and_memory_by_hand():
    h = load_routing(HAND)
    assert HOT.dep_owner_shares(h, 4) == [pytest.approx([0.51, 0.02, 0.41, 0.06])]
    (hl,) = HOT.hot_layers(h, 4, 2)
    assert hl.hot == (0, 4) and hl.hot_share == pytest.approx(0.90)
    assert hl.cold_owner_shares == pytest.approx((0.01, 0.02, 0.01, 0.06)) and hl.hot_owned == (1, 0, 1, 0)
    shape = A.get_shape(TINY_GQA)
    eb = 3 * 64 * 32 * 2  # one bf16 expert: gate, up, down of 64 x 32
    m = HOT.hot_memory(shape, 4, "bf16", 2, [hl])
    # DEP's shard: 2 experts a layer x 2 layers; slots: ranks 1 and 3 own no hot expert, so they hold
    # both hot experts in each of the 2 slots (a slot is one layer's worth)
    assert m["sharded_nbytes"] == 2 * eb * 2 == 49152
    assert m["slot_experts"] == 2 and m["slot_nbytes"] == 2 * 2 * eb == 49152
    assert m["total_nbytes"] == 98304 and m["hot_owned_max"] == 1


def test_no_hot_experts_is_dep_and_uniform_shares_are_no_histogram():
    shape = A.get_shape(TINY_GQA)
    costs = A.ComputeCosts({100: {"attention_s": 1e-3, "experts_s": 2e-3, "other_s": 0.5e-3}}, interference=1.1)
    ld = A.Load((100, 300, 200, 50))
    h = load_routing(HAND)
    shares = HOT.dep_owner_shares(h, 4)
    pt = A.predict_point(shape, ld, costs, 5e-3, 1e9, owner_shares=shares)
    hp = HOT.hot_point(shape, ld, costs, HOT.hot_layers(h, 4, 0), 0.0, 1e9)
    assert hp["layer_s"] == pytest.approx(pt["dep_layer_s"])
    assert hp["all_to_all_s"] == pytest.approx(pt["dep_all_to_all_s"])
    # DEP's busiest owner computes 0.51 of all rows: its experts time at 0.51 x 650 tokens
    assert pt["dep_experts_s"] == pytest.approx(2e-3 * 0.51 * 650 / 100) and pt["dep_owner_skew"] == pytest.approx(2.04)
    flat = A.predict_point(shape, ld, costs, 5e-3, 1e9, owner_shares=[[0.25] * 4])
    none = A.predict_point(shape, ld, costs, 5e-3, 1e9)
    assert flat["dep_layer_s"] == pytest.approx(none["dep_layer_s"])
    assert flat["speedup"] == pytest.approx(none["speedup"])


def test_hot_point_formula():
    shape = A.get_shape(TINY_GQA)
    costs = A.ComputeCosts({100: {"attention_s": 1e-3, "experts_s": 2e-3, "other_s": 0.5e-3}}, interference=1.1)
    ld = A.Load((100, 300, 200, 50))
    layers = HOT.hot_layers(load_routing(HAND), 4, 2)
    hp = HOT.hot_point(shape, ld, costs, layers, 1e-3, 1e9, a2a_efficiency=0.5)
    # busiest rank before the dispatch: 300 tokens of attention + other, and its hot rows (0.9 of them) local
    pre = (4.5e-3 + 2e-3 * 3 * 0.9) * 1.1
    cold = 2e-3 * 0.06 * 650 / 100 * 1.1  # the busiest cold owner (rank 3: 6 % of all rows)
    send = 300 * 2 * 0.1 * 0.75 * 64 * 2
    recv = 0.06 * 650 * 2 * 0.75 * 64 * 2
    a2a = 2 * (max(send, recv) / (0.5 * 1e9) + 30e-6)
    assert hp["layer_s"] == pytest.approx(max(pre + cold + a2a, 1e-3))
    assert hp["owner_skew"] == pytest.approx(0.06 * 4 / 0.1) and hp["hot_share"] == pytest.approx(0.9)
    slow = HOT.hot_point(shape, ld, costs, layers, 1.0, 1e9)  # a 1 s prefetch: it is the layer
    assert slow["layer_s"] == 1.0 and slow["exposed_s"] > 0.9


# ---- the answer ---------------------------------------------------------------------------------------------------
def _deepseek(routing, tokens=2048, **kw):
    return A.advise("deepseek-v3", 4, measure="no", mean_tokens=tokens, cv=0.2, routing=routing,
                    schedules=["parallel"], chunks=[0], **kw)


def zipf_histogram(s: float) -> dict:
    # 3 layers of DeepSeek-V3 routing (256 experts, top-8, 64K tokens), each its own hot set
    return {"top_k": 8, "layers": {str(3 + i): zipf_counts(256, s, 65536 * 8, seed=i) for i in range(3)}}


def test_skewed_histogram_answers_hot_replication():
    hist = zipf_histogram(0.8)
    top = max(max(c) for c in hist["layers"].values())
    assert top <= 65536  # a top-k router picks an expert at most once a token: the histogram is realisable
    res = _deepseek(hist)
    h = res["hot"]
    assert h["answer"] == "hot" and "answer: replicate the hot experts" in h["reason"]
    tps = h["tokens_per_s_per_gpu"]
    assert tps["hot"] > tps["dep"] > tps["dwdp"]  # at 2K tokens full DWDP's 44 ms pull is exposed
    assert h["point"]["hot_share"] > 0.4 and h["point"]["owner_skew"] < res["point"]["dep_owner_skew"]
    # a minimum load, stated plainly, below which DEP wins
    mt = h["min_tokens"]["0.2"]
    assert mt is not None and 512 < mt < 2048 and f"below {mt:.0f} tokens per rank (cv 0.2) DEP wins" in h["reason"]
    below = [r for r in h["sweep"] if r["cv"] == 0.2 and r["mean_tokens"] < mt]
    assert below and all(r["hot_vs_dep"] < 1 for r in below)
    # its memory: DEP's shard plus slots of the hot experts a rank lacks, less than full DWDP's
    m = h["memory"]
    assert m["total_nbytes"] == m["sharded_nbytes"] + m["slot_nbytes"] == \
        m["sharded_nbytes"] + res["choice"]["depth"] * m["slot_experts"] * m["expert_nbytes"]
    assert m["sharded_nbytes"] == res["memory"]["dep_nbytes"] < m["total_nbytes"] < res["memory"]["dwdp_nbytes"]
    # at a large load every expert's prefetch hides: full DWDP (no all-to-all, no waiting) wins again
    assert _deepseek(hist, tokens=16384)["hot"]["answer"] == "dwdp"


def test_flat_histogram_does_not_answer_hot_replication():
    flat = {"top_k": 8, "layers": {"3": [2048] * 256, "4": [2048] * 256}}
    for tokens in (1024, 2048, 4096, 16384):
        h = _deepseek(flat, tokens=tokens)["hot"]
        assert h["answer"] != "hot", tokens
        assert h["min_tokens"]["0.2"] is None and "DEP wins at every load of the sweep" in h["reason"]
    res = _deepseek(flat)
    assert res["point"]["dep_owner_skew"] == pytest.approx(1.0)
    assert res["point"]["dep_layer_s"] == pytest.approx(_deepseek(None)["point"]["dep_layer_s"])


def test_advise_routing_errors():
    with pytest.raises(InvalidArgumentError, match="routing top_k: got 2, expected 8"):
        _deepseek({"top_k": 2, "layers": {"0": [1] * 256}})
    with pytest.raises(InvalidArgumentError, match="the model's num_experts"):
        _deepseek({"layers": {"0": [1] * 8}})


def test_cli_routing_csv(tmp_path, capsys):
    p = tmp_path / "routing.csv"
    rows = ["layer,expert,count"] + [f"{l},{e},{c}" for l in (3, 4)
                                     for e, c in enumerate(zipf_counts(256, 0.8, 65536 * 8, seed=l)) if c]
    p.write_text("\n".join(rows) + "\n")
    out = tmp_path / "a.json"
    assert main(["advise", "-m", "deepseek-v3", "-g", "4", "--measure", "no", "-t", "2048", "--routing", str(p),
                 "--hot-experts", "8,16,32", "-s", "parallel", "-c", "0", "--sweep", "1024,2048,4096",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "# routing: histogram routing.csv: 2 layer(s), 256 experts" in text
    assert "# hot-expert replication: answer: replicate the hot experts" in text
    assert "# hot-expert memory per rank" in text and "(tok/s/GPU)" in text
    head = next(l for l in text.splitlines() if l.startswith("#") and "tok/rank" in l)
    assert head.split()[-1] == "hot"
    doc = json.loads(out.read_text())
    assert doc["hot"]["hot_experts"] in (8, 16, 32)
    assert [c["hot_experts"] for c in doc["hot"]["candidates"]] == [8, 16, 32]
    assert len(doc["hot"]["sweep"]) == len(doc["sweep"])

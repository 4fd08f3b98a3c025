"""Quantized experts in the store: weights and their scales of every dtype travel in one prefetch.

Sim backend, 7 experts over 2 and 3 ranks (uneven splits), two layers, one launch per world size.
Each layer registers the storage of every quantized format (float8_e4m3fn weights with float32
block or channel scales, uint8 packed fp4 with uint8 and float8_e8m0fnu e8m0 scales, a bf16 bias):
one handle per layer delivers every name byte-exact in its own dtype, whole and as segments, and
the slot and the copy plan count the scales.
"""

import pytest

import dwdp_comm as dc
from tests.helpers import quant_rankfns

NUM_EXPERTS, LAYERS = 7, [0, 3]


@pytest.fixture(scope="module", params=[2, 3], ids=["G2", "G3"])
def results(request):
    return request.param, dc.testing.launch(quant_rankfns.quantized_store, request.param, NUM_EXPERTS, LAYERS,
                                            request.param * 11, timeout=120)


def test_every_dtype_arrives_byte_exact(results):
    _, res = results
    for rank, r in enumerate(res):
        assert r["wrong"] == [], (rank, r["wrong"][:5])
        assert r["dtypes"] == {n: str(d) for n, (_, d) in quant_rankfns.QUANT_SPECS.items()}, (rank, r["dtypes"])
        assert r["modes"]["fp8_w"] == "composite" and r["modes"]["fp8_w_scale_inv"] == "gather", r["modes"]


def test_slots_and_plans_count_the_scales(results):
    world_size, res = results
    specs = quant_rankfns.QUANT_SPECS
    per_expert = sum(d.itemsize * _numel(s) for s, d in specs.values())
    lay = [dc.ExpertLayout(NUM_EXPERTS, world_size, r) for r in range(world_size)]
    for rank, r in enumerate(res):
        nl = lay[rank].num_local_experts
        assert r["local_nbytes"] == nl * per_expert  # local rows: weights, scales and bias
        assert r["slot_nbytes"] >= r["slot_need"] > 0
        for layer in LAYERS:
            assert r["remote_nbytes"][layer] == (NUM_EXPERTS - nl) * per_expert
            # one plan per layer: every remote byte of every name, plus the local rows of gather names
            assert r["pulled"][layer] == r["remote_nbytes"][layer] + r["gather_local_nbytes"]


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n

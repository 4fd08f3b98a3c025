"""Randomized integrity on the sim backend: 210 seeded configs (group sizes 2-5, uneven
experts, every dtype, zero-size and odd-size experts, chunks from 1 byte, every schedule, depth 1-3,
subset prefetches), every delivered byte compared. Many configs per launch (process start-up is the
expensive part). ``DWDP_INTEGRITY_SEED`` replays a run; the seed is printed."""
import os
import random

import pytest

import dwdp_comm as dc
from tests.helpers import integrity_rankfns

CONFIGS = {2: 80, 3: 60, 4: 40, 5: 30}  # 210 configs


@pytest.mark.parametrize("group_size", sorted(CONFIGS))
def test_random_configs_every_byte(group_size):
    seed = int(os.environ.get("DWDP_INTEGRITY_SEED", random.SystemRandom().randrange(2**31)))
    print(f"DWDP_INTEGRITY_SEED={seed}")
    res = dc.testing.launch(integrity_rankfns.integrity, group_size, seed, CONFIGS[group_size], timeout=240)
    for rank, r in enumerate(res):
        assert r["configs"] == CONFIGS[group_size]
        assert r["wrong"] == [], f"rank {rank}, seed {seed}: wrong bytes at {r['wrong'][:10]}"
        assert r["bytes"] > 0
    assert set().union(*(r["modes"] for r in res)) == {"composite", "gather"}

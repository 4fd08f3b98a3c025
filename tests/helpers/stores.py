"""Ground truth for the launched tests: reproducible expert tensors, a store filled with them, and
the error helpers rank functions report with.

Every expert tensor is drawn from a generator seeded by (run seed, layer, name, expert), so every
rank can rebuild the whole ``[num_experts, ...]`` tensor of any layer and compare the bytes it
prefetched. The run seed is fresh per test run (the ``seed`` fixture).
"""

from __future__ import annotations

import zlib

import torch

import dwdp_comm as dc
from perf.fault_cases import error_fields, error_of  # one home: perf times the fault cases tests check

__all__ = ["SPECS", "expert_tensor", "full_truth", "build_store", "same_bytes", "error_of", "error_fields"]


# name -> (per-expert shape, dtype). On sim, mapping granularity is the 4 KiB page: "w13" (16x64
# float32 = 4 KiB per expert) is served as a composite view, the others through gather mode.
SPECS = {
    "w13": ((16, 64), torch.float32),
    "w2": ((8, 12), torch.bfloat16),
    "w13_scale": ((5,), torch.float8_e4m3fn),
}


def expert_tensor(seed: int, layer: int, name: str, expert: int, shape, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed((seed * 1_000_003 + layer * 10_007 + zlib.crc32(name.encode()) * 31 + expert)
                                      % (2**63))
    if dtype == torch.float8_e4m3fn:  # arbitrary bytes, NaN patterns included: compared as bytes
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).view(dtype)
    return torch.randn(shape, generator=g).to(dtype)


def full_truth(seed, layer, name, num_experts, specs=SPECS) -> torch.Tensor:
    shape, dtype = specs[name]
    return torch.stack([expert_tensor(seed, layer, name, e, shape, dtype) for e in range(num_experts)])


def build_store(group, num_experts: int, layers, seed: int, specs=SPECS) -> dc.WeightStore:
    lay = dc.ExpertLayout(num_experts, group.size, group.rank)
    st = dc.WeightStore(group, lay)
    for l in layers:
        for name, (shape, dtype) in specs.items():
            st.register(l, name, torch.stack([expert_tensor(seed, l, name, e, shape, dtype) for e in lay.local_experts]))
    st.commit()
    return st


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


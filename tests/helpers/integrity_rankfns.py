"""Randomized byte integrity (tests/cpu/test_integrity.py): random layouts, dtypes, shapes,
schedules, chunk sizes and subsets, every delivered byte compared."""

from __future__ import annotations

import zlib

import numpy as np
import torch

import dwdp_comm as dc
from tests.helpers.stores import same_bytes


INTEGRITY_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn,
                    torch.float8_e5m2, torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool,
                    torch.complex64]


def integrity_config(rng, G: int) -> dict:
    """One random config (the same on every rank: ``rng`` is seeded identically)."""
    E = G + rng.randrange(0, 3 * G + 4)  # uneven most of the time
    names = {}
    for k in range(rng.randrange(1, 4)):
        dtype = rng.choice(INTEGRITY_DTYPES)
        kind = rng.random()
        if kind < 0.15:
            shape = (rng.randrange(0, 3), 0)            # zero-size experts
        elif kind < 0.35:
            shape = (4096 // dtype.itemsize,)           # one page: composite mode on sim
        else:
            shape = tuple(rng.randrange(1, 9) for _ in range(rng.randrange(1, 3)))  # odd sizes
        names[f"t{k}"] = (shape, dtype)
    layers = sorted(rng.sample(range(8), rng.randrange(1, 4)))
    return {"E": E, "names": names, "layers": layers, "depth": rng.randrange(1, 4),
            "schedule": rng.choice(["round_robin", "rotated", "naive"]),
            "chunk": rng.choice([1, 3, 7, 64, 1000, 4096, 1 << 20]), "rounds": rng.randrange(1, 4)}


def _integrity_tensor(seed: int, layer: int, name: str, expert: int, shape, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed((seed * 1_000_003 + layer * 10_007 + zlib.crc32(name.encode()) * 31 + expert)
                                      % (2**63))
    n = int(np.prod(shape)) * dtype.itemsize
    return torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).view(dtype).view(shape)


def integrity(group, seed: int, num_configs: int):
    """Run ``num_configs`` random configs in this one launch; compare every delivered byte of every
    present expert (subset prefetches included). Returns per-config counts and any mismatch."""
    import random
    rng = random.Random(seed * 7919 + group.size)
    out = {"configs": 0, "bytes": 0, "wrong": [], "modes": set()}
    for c in range(num_configs):
        cfg = integrity_config(rng, group.size)
        lay = dc.ExpertLayout(cfg["E"], group.size, group.rank)
        st = dc.WeightStore(group, lay)
        for l in cfg["layers"]:
            for n, (shape, dtype) in cfg["names"].items():
                st.register(l, n, torch.stack([_integrity_tensor(seed + c, l, n, e, shape, dtype)
                                               for e in lay.local_experts]))
        st.commit()
        out["modes"] |= {st.slot_mode(cfg["layers"][0], n) for n in cfg["names"]}
        pf = dc.Prefetcher(st, depth=cfg["depth"], schedule=cfg["schedule"], chunk_nbytes=cfg["chunk"])
        todo = [l for _ in range(cfg["rounds"]) for l in cfg["layers"]]
        pending = []
        for l in todo:
            subset = None
            if rng.random() < 0.4:  # a subset prefetch: the same draw on every rank is not needed
                subset = sorted(random.Random(seed + c + l + group.rank).sample(range(cfg["E"]),
                                                                                 rng.randrange(0, cfg["E"] + 1)))
            pending.append((l, subset, pf.prefetch(l, experts=subset)))
            if len(pending) == cfg["depth"]:
                _check_handle(out, c, seed, cfg, lay, *pending.pop(0))
        while pending:
            _check_handle(out, c, seed, cfg, lay, *pending.pop(0))
        st.close()
        out["configs"] += 1
    out["modes"] = sorted(out["modes"])
    return out


def _check_handle(out, c, seed, cfg, lay, layer, subset, h):
    h.wait()
    present = h.present_experts
    for n, (shape, dtype) in cfg["names"].items():
        w = h.weights(n, experts=present)
        for e in present:
            want = _integrity_tensor(seed + c, layer, n, e, shape, dtype)
            if not same_bytes(w[e], want):
                out["wrong"].append((c, layer, n, e))
            out["bytes"] += want.numel() * want.element_size()
        if len(present) == cfg["E"]:
            for start, t in h.weight_segments(n):
                for i in range(t.shape[0]):
                    if not same_bytes(t[i], _integrity_tensor(seed + c, layer, n, start + i, shape, dtype)):
                        out["wrong"].append((c, layer, n, start + i, "segment"))
    h.release()

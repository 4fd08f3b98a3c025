"""Grouped-GEMM cases shared by the kernel tests of both tiers (tests/cpu/test_kernels.py,
tests/cpu/test_kernels_numba_sim.py, tests/gpu/test_kernels_gpu.py): random problems, every split
form of the weights, the float64 reference and the relative error."""

from __future__ import annotations

import math

import numpy as np
import torch

import dwdp_comm.kernels as K
from dwdp_comm.kernels import reference

__all__ = ["TOL", "rel_err", "random_sizes", "make_case", "cuts", "split_forms", "ref64"]

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; inf when out has a NaN/inf or shapes differ."""
    if tuple(out.shape) != tuple(ref.shape):
        return math.inf
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(o).all():
        return math.inf
    num, den = (o - r).norm().item(), r.norm().item()
    return num / den if den > 0 else num


def random_sizes(rng: np.random.Generator, num_experts: int, num_tokens: int, empty_frac: float = 0.3) -> list[int]:
    """Uneven token counts summing to num_tokens, with about empty_frac of experts empty."""
    p = rng.gamma(0.7, size=num_experts) + 1e-3
    p[rng.random(num_experts) < empty_frac] = 0
    if p.sum() == 0:
        p[rng.integers(num_experts)] = 1
    return rng.multinomial(num_tokens, p / p.sum()).tolist()


def make_case(seed: int, E: int, Kd: int, N: int, T: int, dtype: torch.dtype, device="cpu",
              layout: str = "kn", empty_frac: float = 0.3):
    """(x [T, K], sizes [E], w [E, K, N]) with fresh random data; layout "nk" stores [E, N, K]."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    sizes = random_sizes(rng, E, T, empty_frac)
    x = torch.randn(T, Kd, generator=g).to(dtype).to(device)
    if layout == "kn":
        w = (torch.randn(E, Kd, N, generator=g) / math.sqrt(max(Kd, 1))).to(dtype).to(device)
    else:
        w = (torch.randn(E, N, Kd, generator=g) / math.sqrt(max(Kd, 1))).to(dtype).to(device).transpose(1, 2)
    return x, sizes, w


def cuts(rng: np.random.Generator, E: int) -> list[int]:
    """Random piece boundaries 0 = c0 < c1 < ... < E."""
    inner = sorted(rng.choice(np.arange(1, E), size=rng.integers(0, E), replace=False).tolist()) if E > 1 else []
    return [0] + inner + [E]


def split_forms(w: torch.Tensor, seed: int) -> dict:
    """Every accepted weights form of w, each reading w's data (views) or an equal copy."""
    rng = np.random.default_rng(seed + 1)
    E = w.shape[0]
    c = cuts(rng, E)
    forms = {
        "tensor": w,
        "segments": [(a, w[a:b]) for a, b in zip(c[:-1], c[1:])],
        "per_owner": [w[a:b] for a, b in zip(c[:-1], c[1:])],
        "per_expert": [w[e] for e in range(E)],
        "mixed_2d_3d": [w[a] if b - a == 1 else w[a:b] for a, b in zip(c[:-1], c[1:])],
        "separate_allocs": [w[a:b].clone() for a, b in zip(c[:-1], c[1:])],
        "dwdp_3_pieces": [(0, w[:E // 3]), (E // 3, w[E // 3:2 * E // 3].clone()), (2 * E // 3, w[2 * E // 3:])],
    }
    forms["dwdp_3_pieces"] = [(f, t) for f, t in forms["dwdp_3_pieces"] if t.shape[0]]
    return forms


def ref64(x, sizes, w, **kw) -> torch.Tensor:
    """The oracle: float64 result of the reference backend."""
    return reference.run(K.make_problem(x, sizes, w, **kw), out_dtype=torch.float64)


# ---- reference ---------------------------------------------------------------------------------

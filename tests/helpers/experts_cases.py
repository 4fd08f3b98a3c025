"""Shared cases of the experts_forward tests (CPU and GPU): fresh random data, fast path vs reference."""
import torch
import torch.nn.functional as F

from dwdp_comm import moe

GATE_FNS = {"swiglu": "swiglu", "interleaved": "swiglu_interleaved", "none": None,
            "relu_glu": lambda h: F.relu(h[:, :h.shape[1] // 2]) * h[:, h.shape[1] // 2:]}


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def case(device, dtype, *, E=8, T=53, H=32, I=24, k=3, layout="nk", gate="swiglu", bias=False, form="whole",
         sentinels=True, seed=0, split_path="per_piece"):
    g = torch.Generator(device="cpu").manual_seed(seed)
    gate = GATE_FNS[gate]
    N = I if gate is None else 2 * I

    def rnd(*s):
        return torch.randn(*s, generator=g).to(device, dtype)
    gu = rnd(E, N, H) if layout == "nk" else rnd(E, H, N)
    dn = rnd(E, H, I) if layout == "nk" else rnd(E, I, H)
    x = rnd(T, H)
    idx = torch.randint(0, E, (T, k), generator=g)
    if sentinels:
        idx[0, 0], idx[5 % T, k - 1] = E, -1
        idx[7 % T, :] = E + 3  # a token routed to no local expert at all
    idx = idx.to(device)
    w = torch.rand(T, k, generator=g).to(device)
    b1 = rnd(E, N) if bias else None
    b2 = rnd(E, H) if bias else None
    ref = moe.experts_forward_reference(x, idx, w, gu, dn, gate_up_bias=b1, down_bias=b2, weight_layout=layout,
                                        gate=gate)
    if form == "split":
        cut = [0, 2, 3, E - 2, E]
        gu_a = [(a, gu[a:b].clone()) for a, b in zip(cut[:-1], cut[1:])]
        dn_a = [dn[:E // 2].clone(), dn[E // 2:].clone()]
        b1_a = None if b1 is None else [(a, b1[a:b]) for a, b in zip(cut[:-1], cut[1:])]
    elif form == "slices":  # pieces that are views of one buffer, as a composite handle's weight_segments
        cut = [0, 3, E - 2, E]
        gu_a = [(a, gu[a:b]) for a, b in zip(cut[:-1], cut[1:])]
        dn_a = [(a, dn[a:b]) for a, b in zip(cut[:-1], cut[1:])]
        b1_a = None if b1 is None else [(a, b1[a:b]) for a, b in zip(cut[:-1], cut[1:])]
    elif form == "strided":  # a view of a bigger buffer: expert stride larger than the data
        big = torch.zeros(E, gu.shape[1] + 8, gu.shape[2], device=device, dtype=dtype)
        big[:, 4:4 + gu.shape[1]] = gu
        gu_a, dn_a, b1_a = big[:, 4:4 + gu.shape[1]], dn, b1
    else:
        gu_a, dn_a, b1_a = gu, dn, b1
    info = {}
    got = moe.experts_forward(x, idx, w, gu_a, dn_a, gate_up_bias=b1_a, down_bias=b2, weight_layout=layout,
                              gate=gate, info=info, split_path=split_path)
    assert got.shape == (T, H) and got.dtype == dtype
    if sentinels:
        assert torch.all(got[7 % T] == 0)
    return rel(got, ref), info


def quant_case(device, fmt, *, E=8, T=53, H=256, I=160, k=3, form="whole", gate="swiglu", bias=False,
               block_size=(128, 128), seed=0, quantize_activations=None, sentinels=True, **kw):
    """experts_forward on quantized weights (``fmt`` of dwdp_comm.kernels.quant) against the reference
    on the same quantized weights. ``form``: "whole", "split" (separate allocations, gate-up and down
    split differently, scales split like their weights), "slices" (views of one buffer), "scale_whole"
    (weight pieces, one scale tensor). Returns (relative error, info)."""
    from dwdp_comm.kernels import quant
    g = torch.Generator(device="cpu").manual_seed(seed)
    gate = GATE_FNS[gate]
    N = I if gate is None else 2 * I
    gu_real = (torch.randn(E, N, H, generator=g) / H ** 0.5).to(device)
    dn_real = (torch.randn(E, H, I, generator=g) / I ** 0.5).to(device)
    gu, s1 = quant.quantize(gu_real, fmt, block_size=block_size)
    dn, s2 = quant.quantize(dn_real, fmt, block_size=block_size)
    x = torch.randn(T, H, generator=g).to(device, torch.bfloat16)
    idx = torch.randint(0, E, (T, k), generator=g)
    if sentinels:
        idx[0, 0], idx[5 % T, k - 1] = E, -1
        idx[7 % T, :] = E + 3
    idx = idx.to(device)
    w = torch.rand(T, k, generator=g).to(device)
    b1 = (torch.randn(E, N, generator=g) * 0.1).to(device) if bias else None
    b2 = (torch.randn(E, H, generator=g) * 0.1).to(device) if bias else None
    if quantize_activations is None:  # the fast path quantizes fp8 activations where its kernels run
        quantize_activations = device != "cpu" and fmt in ("fp8_channel", "fp8_block")
    ref = moe.experts_forward_reference(x, idx, w, gu, dn, gate_up_scale=s1, down_scale=s2, weight_format=fmt,
                                        block_size=block_size, gate_up_bias=b1, down_bias=b2, gate=gate,
                                        quantize_activations=quantize_activations)
    if form in ("split", "slices", "scale_whole"):
        c1, c2 = [0, 2, 3, E - 2, E], [0, E // 2, E]
        own = (lambda t: t.clone()) if form == "split" else (lambda t: t)
        gu_a = [(a, own(gu[a:b])) for a, b in zip(c1[:-1], c1[1:])]
        dn_a = [(a, own(dn[a:b])) for a, b in zip(c2[:-1], c2[1:])]
        s1_a = s1 if form == "scale_whole" else [(a, own(s1[a:b])) for a, b in zip(c1[:-1], c1[1:])]
        s2_a = s2 if form == "scale_whole" else [(a, own(s2[a:b])) for a, b in zip(c2[:-1], c2[1:])]
    else:
        gu_a, dn_a, s1_a, s2_a = gu, dn, s1, s2
    info = {}
    got = moe.experts_forward(x, idx, w, gu_a, dn_a, gate_up_scale=s1_a, down_scale=s2_a, block_size=block_size,
                              gate_up_bias=b1, down_bias=b2, gate=gate, info=info, **kw)
    assert got.shape == (T, H) and got.dtype == x.dtype
    assert info["format"] == fmt, info
    if sentinels:
        assert torch.all(got[7 % T] == 0)
    return rel(got, ref), info

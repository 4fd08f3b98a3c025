"""Rank functions of the quantized-experts store tests (module level: dwdp_comm.testing.launch pickles them).

Quantized experts travel as two names per projection: the weight and its scales, each of its own
dtype. Ground truth is drawn per (seed, layer, name, expert) as raw bytes, so every rank can
rebuild any expert of any name and compare bytes (NaN patterns of the float8 dtypes included).
"""

from __future__ import annotations

import zlib

import torch

import dwdp_comm as dc

# name -> (per-expert shape, dtype): the storage of each format of dwdp_comm.kernels.quant, one
# projection of N=32 rows, K=128 columns. On sim (4 KiB pages) the fp8 weight is one page per expert
# (composite mode); everything else is served through gather mode.
QUANT_SPECS = {
    # fp8_block: float8_e4m3fn [N, K] + float32 [ceil(N/16), ceil(K/48)] (a partial last block)
    "fp8_w": ((32, 128), torch.float8_e4m3fn),
    "fp8_w_scale_inv": ((2, 3), torch.float32),
    # fp8_channel: float32 [N]
    "fp8_w_channel_scale": ((32,), torch.float32),
    # mxfp4: uint8 [N, K/2] (two e2m1 a byte) + uint8 e8m0 [N, K/32], and the same scales as float8_e8m0fnu
    "fp4_w": ((32, 64), torch.uint8),
    "fp4_w_scales": ((32, 4), torch.uint8),
    "fp4_w_scales_e8m0": ((32, 4), torch.float8_e8m0fnu),
    # a bias in the model dtype next to them
    "bias": ((32,), torch.bfloat16),
}


def quant_bytes(seed: int, layer: int, name: str, expert: int, shape, dtype) -> torch.Tensor:
    """Expert ``expert``'s tensor of ``name``: random bytes viewed as ``dtype`` (the same on every rank)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + layer * 10_007 + zlib.crc32(name.encode()) * 31 + expert)
                                      % (2**63))
    n = 1
    for s in shape:
        n *= s
    return torch.randint(0, 256, (n * dtype.itemsize,), generator=g, dtype=torch.uint8).view(dtype).view(shape)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8),
                                                                     b.contiguous().view(torch.uint8))


def quantized_store(group, num_experts: int, layers, seed: int, depth: int = 2):
    """Register every name of :data:`QUANT_SPECS` for each layer, prefetch each layer once (one
    handle carries weights and scales), and report what arrived.

    Returns a dict: ``wrong`` (``(layer, name, expert, how)`` of every byte mismatch), ``dtypes``
    (name -> dtype delivered), ``modes`` (name -> slot mode), ``slot_nbytes``, ``slot_need`` (the
    bytes every name's slot rows take, scales included), ``remote_nbytes`` (per layer),
    ``local_nbytes`` (every name's local rows), ``gather_local_nbytes`` (local rows of gather-mode
    names, which a prefetch copies into the slot too), ``pulled`` (bytes a prefetch copied, per layer).
    """
    torch.set_num_threads(1)
    lay = dc.ExpertLayout(num_experts, group.size, group.rank)
    st = dc.WeightStore(group, lay)
    for layer in layers:
        for name, (shape, dtype) in QUANT_SPECS.items():
            st.register(layer, name, torch.stack([quant_bytes(seed, layer, name, e, shape, dtype)
                                                  for e in lay.local_experts]))
    st.commit()
    out = {"wrong": [], "dtypes": {}, "modes": {}, "pulled": {}, "remote_nbytes": {}}
    out["local_nbytes"] = sum(st.local(layers[0], n).numel() * st.local(layers[0], n).element_size()
                              for n in QUANT_SPECS)
    out["modes"] = {n: st.slot_mode(layers[0], n) for n in QUANT_SPECS}
    out["slot_need"] = sum((num_experts - (lay.num_local_experts if out["modes"][n] == "composite" else 0))
                           * st.spec(layers[0], n).expert_nbytes for n in QUANT_SPECS)
    out["slot_nbytes"] = st.slot_nbytes
    out["gather_local_nbytes"] = sum(lay.num_local_experts * st.spec(layers[0], n).expert_nbytes
                                     for n in QUANT_SPECS if out["modes"][n] == "gather")
    with dc.Prefetcher(st, depth=depth, chunk_nbytes=1000) as pf:
        for layer in layers:
            before = pf.nbytes_prefetched
            h = pf.prefetch(layer)
            h.wait()
            for name, (shape, dtype) in QUANT_SPECS.items():
                w = h.weights(name)
                out["dtypes"][name] = str(w.dtype)
                for e in range(num_experts):
                    if not _same(w[e], quant_bytes(seed, layer, name, e, shape, dtype)):
                        out["wrong"].append((layer, name, e, "weights"))
                nxt = 0
                for first, t in h.weight_segments(name):
                    if first != nxt or t.dtype != dtype:
                        out["wrong"].append((layer, name, first, "segment order or dtype"))
                    for i in range(t.shape[0]):
                        if not _same(t[i], quant_bytes(seed, layer, name, first + i, shape, dtype)):
                            out["wrong"].append((layer, name, first + i, "segments"))
                    nxt = first + t.shape[0]
                if nxt != num_experts:
                    out["wrong"].append((layer, name, nxt, "segments cover"))
            h.release()
            out["pulled"][layer] = pf.nbytes_prefetched - before
            out["remote_nbytes"][layer] = st.remote_nbytes(layer)
    st.close()
    return out

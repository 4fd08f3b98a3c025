"""The MXFP4 kernel's PTX decode (``e2m1_ptx.E2M1_BF16_PTX``) run by a small PTX
interpreter on CPU, against the torch reference (:func:`dwdp_comm.kernels.quant.dequantize`), for
every packed byte and a range of scales. Triton's interpreter cannot run inline assembly, so this
is what checks the PTX text without a GPU; the GPU tests check it compiled."""

import re

import numpy as np
import pytest
import torch

from dwdp_comm.kernels import e2m1_ptx
from dwdp_comm.kernels import quant as Q


def _bf16_bits_to_f64(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _f64_to_bf16_bits(v: np.ndarray) -> np.ndarray:
    # exact products (8-bit mantissas) rounded once, to nearest even, by torch's float32 -> bf16 cast
    with np.errstate(over="ignore"):  # 6 x 2^127 is inf in both float32 and bf16
        v32 = v.astype(np.float32)
    return torch.from_numpy(v32).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def _prmt(a, b, sel):
    src = (b.astype(np.uint64) << np.uint64(32)) | a.astype(np.uint64)
    out = np.zeros_like(a)
    for i in range(4):
        s = (int(sel) >> (4 * i)) & 0xF
        assert s < 8, "sign-replicate selectors are not emulated"
        out |= ((src >> np.uint64(8 * s)) & np.uint64(0xFF)).astype(np.uint32) << np.uint32(8 * i)
    return out


def _lop3(a, b, c, lut):
    out = np.zeros_like(a)
    for bit_a in (0, 1):
        for bit_b in (0, 1):
            for bit_c in (0, 1):
                if (lut >> (bit_a * 4 + bit_b * 2 + bit_c)) & 1:
                    out |= (a if bit_a else ~a) & (b if bit_b else ~b) & (c if bit_c else ~c)
    return out


def _fma_bf16x2(a, b, c):
    lanes = []
    for shift in (0, 16):
        f = [_bf16_bits_to_f64((x >> np.uint32(shift)) & np.uint32(0xFFFF)) for x in (a, b, c)]
        lanes.append(_f64_to_bf16_bits(f[0] * f[1] + f[2]).astype(np.uint32) << np.uint32(shift))
    return lanes[0] | lanes[1]


def run_ptx(text: str, regs: dict) -> dict:
    """Execute ``text`` (the instruction subset the decode uses) on uint32 arrays; ``regs`` maps
    ``$i`` operands to arrays. Any other instruction fails the test: a new one needs emulating."""
    env = dict(regs)

    def val(tok):
        tok = tok.strip()
        if tok in env:
            return env[tok]
        return np.uint32(int(tok, 0))

    for line in text.splitlines():
        line = line.strip().rstrip(";")
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        args = [a.strip() for a in args.split(",")]
        d, src = args[0], [val(a) for a in args[1:]]
        if op == "mov.b32":
            res = np.broadcast_to(np.uint32(src[0]), next(iter(regs.values())).shape).copy()
        elif op == "prmt.b32":
            res = _prmt(np.asarray(src[0], np.uint32) * np.ones_like(next(iter(regs.values()))),
                        np.asarray(src[1], np.uint32) * np.ones_like(next(iter(regs.values()))), src[2])
        elif op == "shl.b32":
            res = (src[0].astype(np.uint64) << np.uint64(int(src[1]))).astype(np.uint32)
        elif op == "and.b32":
            res = src[0] & src[1]
        elif op == "lop3.b32":
            shape = next(iter(regs.values())).shape
            a, b, c = (np.broadcast_to(np.asarray(x, np.uint32), shape) for x in src[:3])
            res = _lop3(a, b, c, int(src[3]))
        elif op == "fma.rn.bf16x2":
            res = _fma_bf16x2(*src)
        else:
            raise AssertionError(f"instruction {op!r} is not emulated")
        env[d] = np.asarray(res, np.uint32)
    return env


def _ptx() -> str:
    # the text module, not triton_quant_kernels: importing that one here, with the interpreter off,
    # would fix its JIT functions in compiled mode for every later test of this process
    return e2m1_ptx.E2M1_BF16_PTX


def test_ptx_uses_only_emulated_instructions():
    ops = {line.strip().split(None, 1)[0] for line in _ptx().splitlines() if line.strip() not in ("{", "}")}
    assert ops <= {".reg", "mov.b32", "prmt.b32", "shl.b32", "and.b32", "lop3.b32", "fma.rn.bf16x2"}, ops
    assert re.findall(r"\$\d", _ptx()) and set(re.findall(r"\$\d", _ptx())) == {f"${i}" for i in range(6)}


@pytest.mark.parametrize("scales", [(127, 127, 127, 127), (1, 126, 128, 254), (120, 3, 200, 127), (0, 127, 0, 254)])
def test_ptx_decode_equals_reference_for_every_byte(scales):
    """Every packed byte in every position of a 4-byte pack, each position with its own scale (the
    pack's elements need not share one: Triton may group any 4 elements of a thread)."""
    codes = np.arange(256, dtype=np.uint32)
    packs = np.stack([np.roll(codes, 37 * i) for i in range(4)], axis=1)        # [256, 4] bytes
    p = (packs << (8 * np.arange(4, dtype=np.uint32))).sum(1).astype(np.uint32)
    s_arr = np.array(scales, dtype=np.uint32)
    sreg = np.full(256, (s_arr << (8 * np.arange(4, dtype=np.uint32))).sum(), dtype=np.uint32)
    env = run_ptx(_ptx(), {"$4": p, "$5": sreg})
    for out_regs, nibble in ((("$0", "$1"), 0), (("$2", "$3"), 1)):
        got = np.stack([(env[out_regs[j // 2]] >> np.uint32(16 * (j % 2))) & np.uint32(0xFFFF) for j in range(4)], 1)
        q = torch.from_numpy(packs.astype(np.uint8)).view(1024, 1)
        vals = Q.decode_e2m1(q).view(256, 4, 2)[:, :, nibble].double()           # the reference's decoder
        scale = Q.e8m0_to_float(torch.tensor(scales, dtype=torch.uint8)).double()
        scale[torch.tensor(scales) == 0] = 0.0                                     # s = 0 reads as 0 (documented)
        want = _f64_to_bf16_bits((vals * scale).numpy())
        np.testing.assert_array_equal(got.astype(np.uint16), want, err_msg=f"nibble {nibble}, scales {scales}")

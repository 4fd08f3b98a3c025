"""The MXFP4 kernel's e2m1 decode as PTX text (no triton import: the CPU test that runs it through a
small PTX interpreter reads it without defining any JIT function in the wrong mode).

:data:`E2M1_BF16_PTX` is the body of :func:`dwdp_comm.kernels.triton_quant_kernels.e2m1_halves`'s
``tl.inline_asm_elementwise`` call.
"""

__all__ = ["E2M1_BF16_PTX"]

#: PTX of ``e2m1_halves`` (``pack=4``): ``$4`` holds 4 packed e2m1 bytes, ``$5`` their 4 e8m0
#: scales (one byte each, <= 254); ``$0 $1`` get the bf16 values of the low nibbles (bytes 0-1, 2-3),
#: ``$2 $3`` those of the high nibbles. Per pair of bytes: ``prmt`` puts them in the two 16-bit lanes;
#: a nibble's 3 magnitude bits shifted to bits 6-8 and its sign to bit 15 are the bf16 bits of its
#: value times 2^-126 (0.5 is then a subnormal), so one ``fma`` by 2^126 and one by the scale
#: 2^(s - 127) (bits ``s << 7``; s = 0 reads as 0) finish it, both exact (adding -0 keeps signs).
#: ``lop3`` immLut 0xA8 is ``(a | b) & c``. About 3.5 instructions a value (the Triton ops: ~12).
E2M1_BF16_PTX = ("\n".join(
    ["{", ".reg .b32 t, u, a, b, m, sc, c126, nz;", "mov.b32 c126, 0x7E807E80;", "mov.b32 nz, 0x80008000;"]
    + [line for lo, hi, sel in (("$0", "$2", "0x4140"), ("$1", "$3", "0x4342")) for line in (
        f"prmt.b32 t, $4, 0, {sel};", f"prmt.b32 sc, $5, 0, {sel};", "shl.b32 sc, sc, 7;",
        "shl.b32 a, t, 6;", "shl.b32 b, t, 12;", "lop3.b32 m, a, b, 0x81C081C0, 0xA8;",
        "fma.rn.bf16x2 m, m, c126, nz;", f"fma.rn.bf16x2 {lo}, m, sc, nz;",
        "and.b32 u, t, 0x00F000F0;", "shl.b32 a, u, 2;", "shl.b32 b, u, 8;", "lop3.b32 m, a, b, 0x81C081C0, 0xA8;",
        "fma.rn.bf16x2 m, m, c126, nz;", f"fma.rn.bf16x2 {hi}, m, sc, nz;")]
    + ["}"]))

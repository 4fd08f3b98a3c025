"""Quantized expert weights: the formats, their validation, and the dequantize reference.

Formats (``weight_format`` strings; storage always the ``"nk"`` layout, per expert ``[N, K]`` as
``nn.Linear`` and Hugging Face store it):

``"bf16"``
    Plain floating-point weights (bf16, fp16 or float32), no scale.
``"fp8_channel"``
    float8_e4m3fn ``[E, N, K]`` with float32 ``[E, N]`` scales: ``w = q * s[:, None]``.
``"fp8_block"``
    float8_e4m3fn ``[E, N, K]`` with float32 ``[E, ceil(N / bn), ceil(K / bk)]`` scales for
    ``block_size = (bn, bk)`` (default ``(128, 128)``; Hugging Face's ``weight_scale_inv``,
    DeepSeek-V3's checkpoints): ``w[n, k] = q[n, k] * s[n // bn, k // bk]``.
``"mxfp4"``
    OCP MX FP4: uint8 ``[E, N, K // 2]`` holding two e2m1 values a byte (element ``2j`` in the
    low nibble, ``2j + 1`` in the high one; GPT-OSS's ``_blocks`` viewed as ``[E, N, K / 32 * 16]``)
    and uint8 e8m0 ``[E, N, K // 32]`` scales: ``w[n, k] = e2m1(q[n, k]) * 2 ** (s[n, k // 32] - 127)``.
    ``K`` must be a multiple of 32. ``torch.float4_e2m1fn_x2`` weights and ``torch.float8_e8m0fnu``
    scales are read as their uint8 bytes.

Anything else (NVFP4, int4 / AWQ / GPTQ group quantization, bitsandbytes, per-tensor fp8, e5m2)
raises :class:`UnsupportedFormatError` naming it and the supported list: a quantized checkpoint is
never silently dequantized (that multiplies its memory).

:func:`dequantize` is the reference of every quantized kernel and the correct-everywhere fallback;
:func:`quantize` makes quantized weights from floating-point ones (seeded test and benchmark
weights). Everything here is plain torch, any device; nothing is imported lazily.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..errors import InvalidArgumentError, bad_arg, bad_type

__all__ = ["WEIGHT_FORMATS", "QUANTIZED_FORMATS", "DEFAULT_BLOCK_SIZE", "MXFP4_GROUP", "FP8_DTYPE", "FP8_MAX",
           "E2M1_VALUES", "UnsupportedFormatError", "check_format_name", "check_block_size", "infer_format",
           "check_format", "scale_shape", "logical_k", "dequantize", "quantize", "decode_e2m1", "e8m0_to_float",
           "as_bytes"]

WEIGHT_FORMATS = ("bf16", "fp8_channel", "fp8_block", "mxfp4")
QUANTIZED_FORMATS = WEIGHT_FORMATS[1:]
DEFAULT_BLOCK_SIZE = (128, 128)
MXFP4_GROUP = 32  # elements of K sharing one e8m0 scale
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
#: e2m1 value of each 4-bit code (sign bit 3, exponent bits 2-1, mantissa bit 0).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Formats people ask for that are not covered, with what they are (the error names them).
_KNOWN_UNSUPPORTED = {
    "nvfp4": "NVFP4 (e2m1 with fp8 e4m3 scales per 16 elements)",
    "int4": "int4 group quantization (AWQ / GPTQ style)", "awq": "AWQ int4 group quantization",
    "gptq": "GPTQ int4 group quantization", "int8": "int8 weights", "bitsandbytes": "bitsandbytes (nf4 / int8)",
    "nf4": "bitsandbytes nf4", "fp8_tensor": "fp8 with one scale per tensor", "fp8": "fp8 (say which scales: "
    "'fp8_channel' for [E, N] scales, 'fp8_block' for [E, N/128, K/128] block scales)",
    "fp8_e5m2": "fp8 e5m2 weights", "mxfp8": "MXFP8", "fp16": "fp16 (pass 'bf16': it covers every float dtype)",
}


class UnsupportedFormatError(InvalidArgumentError):
    """A weight format this library does not run (named in the message, with the supported list)."""


def _unsupported(what: str, name: str = "weight_format") -> UnsupportedFormatError:
    return UnsupportedFormatError(f"{name}: got {what}, which is not supported; supported formats: "
                                  f"{', '.join(WEIGHT_FORMATS)} (see dwdp_comm.kernels.quant)")


def check_format_name(fmt: Any, name: str = "weight_format") -> str:
    """``fmt`` if it is one of :data:`WEIGHT_FORMATS`, else :class:`UnsupportedFormatError` naming it."""
    if not isinstance(fmt, str):
        raise bad_type(name, fmt, f"one of {WEIGHT_FORMATS} (a str) or None to infer it")
    if fmt in WEIGHT_FORMATS:
        return fmt
    raise _unsupported(repr(fmt) + (f" ({_KNOWN_UNSUPPORTED[fmt.lower()]})" if fmt.lower() in _KNOWN_UNSUPPORTED
                                    else ""), name)


def check_block_size(block_size: Any) -> tuple[int, int]:
    """``block_size`` as ``(bn, bk)`` positive ints, else InvalidArgumentError naming ``block_size``."""
    ok = isinstance(block_size, (tuple, list)) and len(block_size) == 2 and all(
        isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block_size)
    if not ok:
        raise bad_arg("block_size", repr(block_size), "(block_n, block_k): two ints > 0, e.g. (128, 128)")
    return int(block_size[0]), int(block_size[1])


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """uint8 view of fp4-packed weights / e8m0 scales given in torch's own dtypes (no copy)."""
    if t.dtype in (getattr(torch, "float4_e2m1fn_x2", None), getattr(torch, "float8_e8m0fnu", None)):
        return t.view(torch.uint8)
    return t


def _tensor_text(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} {list(t.shape)}"
    return type(t).__name__


def infer_format(weight: torch.Tensor, scale: torch.Tensor | None, *, name: str = "weight",
                 scale_name: str = "scale") -> str:
    """The format of ``weight`` with ``scale`` from their dtypes and ranks (no check of the sizes).

    Raises
    ------
    UnsupportedFormatError
        Dtypes of a format not covered (int4 / int8 packs, NVFP4's fp8 scales, e5m2, ...).
    InvalidArgumentError
        A quantized weight without a scale, or a scale with plain weights.
    """
    if not isinstance(weight, torch.Tensor):
        raise bad_type(name, weight, "a torch.Tensor")
    if scale is not None and not isinstance(scale, torch.Tensor):
        raise bad_type(scale_name, scale, "a torch.Tensor or None")
    wdt, sdt = weight.dtype, None if scale is None else scale.dtype
    if wdt in _FLOAT_DTYPES:
        if scale is not None:
            raise bad_arg(scale_name, _tensor_text(scale), f"None for {wdt} weights (scales go with fp8 / mxfp4 weights)")
        return "bf16"
    if wdt == FP8_DTYPE:
        if scale is None:
            raise bad_arg(scale_name, None, f"float32 scales for the float8_e4m3fn {name}: [E, N] ('fp8_channel') "
                          "or [E, ceil(N/128), ceil(K/128)] ('fp8_block')")
        if scale.dim() == weight.dim() - 1:
            return "fp8_channel"
        if scale.dim() == weight.dim():
            return "fp8_block"
        raise bad_arg(scale_name, _tensor_text(scale), f"[E, N] or [E, N/bn, K/bk] scales for {name} {_tensor_text(weight)}")
    if wdt in (torch.uint8, getattr(torch, "float4_e2m1fn_x2", None)):
        if sdt in (torch.uint8, getattr(torch, "float8_e8m0fnu", None)):
            return "mxfp4"
        if sdt == FP8_DTYPE:
            raise _unsupported(f"{name} {_tensor_text(weight)} with {scale_name} {_tensor_text(scale)} "
                               "(NVFP4: fp4 with e4m3 scales)")
        raise bad_arg(scale_name, _tensor_text(scale), f"uint8 e8m0 scales [E, N, K/32] for the mxfp4 {name}")
    if wdt in (torch.int8, torch.int32, torch.int16, torch.int64):
        raise _unsupported(f"{name} of dtype {wdt} (int4 / int8 group quantization: AWQ, GPTQ, bitsandbytes)")
    if wdt == torch.float8_e5m2:
        raise _unsupported(f"{name} of dtype {wdt} (fp8 e5m2 weights)")
    raise _unsupported(f"{name} of dtype {wdt}")


def logical_k(fmt: str, weight: torch.Tensor) -> int:
    """``K`` of ``[.., N, K]`` storage (mxfp4 packs two values a byte: twice the last dim)."""
    return int(weight.shape[-1]) * (2 if fmt == "mxfp4" else 1)


def scale_shape(fmt: str, n: int, k: int, block_size: Sequence[int] = DEFAULT_BLOCK_SIZE) -> tuple[int, ...] | None:
    """Per-expert shape of the scale of an ``[N, K]`` weight in format ``fmt`` (None: no scale)."""
    if fmt == "fp8_channel":
        return (n,)
    if fmt == "fp8_block":
        bn, bk = block_size
        return (-(-n // bn), -(-k // bk))
    if fmt == "mxfp4":
        return (n, k // MXFP4_GROUP)
    return None


_SCALE_DTYPES = {"fp8_channel": (torch.float32,), "fp8_block": (torch.float32,),
                 "mxfp4": (torch.uint8, getattr(torch, "float8_e8m0fnu", torch.uint8))}
_WEIGHT_DTYPES = {"bf16": _FLOAT_DTYPES, "fp8_channel": (FP8_DTYPE,), "fp8_block": (FP8_DTYPE,),
                  "mxfp4": (torch.uint8, getattr(torch, "float4_e2m1fn_x2", torch.uint8))}


def check_format(weight: torch.Tensor, scale: torch.Tensor | None, fmt: str | None = None, *,
                 block_size: Sequence[int] = DEFAULT_BLOCK_SIZE, name: str = "weight",
                 scale_name: str = "scale") -> str:
    """Check ``weight`` ``[E, N, K]`` (or one expert ``[N, K]``) and its ``scale`` against ``fmt``.

    Parameters
    ----------
    weight, scale : torch.Tensor
        As the module docstring's formats (``scale`` None for ``"bf16"``); same leading dims.
    fmt : str, optional
        One of :data:`WEIGHT_FORMATS`; None infers it (:func:`infer_format`).
    block_size : (int, int)
        ``fp8_block`` only.
    name, scale_name : str
        How the errors name the two tensors.

    Returns
    -------
    str
        The format.

    Raises
    ------
    UnsupportedFormatError, InvalidArgumentError
        The message names the tensor, its dtype and shape, and what was expected.
    """
    fmt = infer_format(weight, scale, name=name, scale_name=scale_name) if fmt is None else \
        check_format_name(fmt)
    if not isinstance(weight, torch.Tensor):
        raise bad_type(name, weight, "a torch.Tensor")
    if weight.dtype not in _WEIGHT_DTYPES[fmt]:
        raise bad_arg(name, _tensor_text(weight), f"{' or '.join(str(d) for d in _WEIGHT_DTYPES[fmt])} weights "
                      f"for weight_format={fmt!r}")
    if weight.dim() not in (2, 3):
        raise bad_arg(name, _tensor_text(weight), "[E, N, K] (or one expert [N, K]) in the 'nk' layout")
    if fmt == "bf16":
        if scale is not None:
            raise bad_arg(scale_name, _tensor_text(scale), "None for weight_format='bf16'")
        return fmt
    if scale is None or not isinstance(scale, torch.Tensor):
        raise bad_arg(scale_name, _tensor_text(scale), f"a scale tensor for weight_format={fmt!r}")
    if scale.dtype not in _SCALE_DTYPES[fmt]:
        raise bad_arg(scale_name, _tensor_text(scale), f"{' or '.join(str(d) for d in _SCALE_DTYPES[fmt])} scales for "
                      f"weight_format={fmt!r}")
    bs = check_block_size(block_size)
    n, k = int(weight.shape[-2]), logical_k(fmt, weight)
    if fmt == "mxfp4" and k % MXFP4_GROUP:
        raise bad_arg(name, _tensor_text(weight), f"K = 2 * {weight.shape[-1]} = {k}: a multiple of {MXFP4_GROUP} "
                      "for mxfp4")
    want = tuple(weight.shape[:-2]) + scale_shape(fmt, n, k, bs)
    if tuple(scale.shape) != want:
        raise bad_arg(scale_name, _tensor_text(scale), f"shape {list(want)} for {name} {_tensor_text(weight)} in "
                      f"weight_format={fmt!r}" + (f", block_size={bs}" if fmt == "fp8_block" else ""))
    if scale.device != weight.device:
        raise bad_arg(scale_name, f"a tensor on {scale.device}", f"the {name}'s device {weight.device}")
    return fmt


def decode_e2m1(packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[..., B]`` uint8 (two e2m1 codes a byte, low nibble first) -> ``[..., 2B]`` values in ``dtype``."""
    lut = torch.tensor(E2M1_VALUES, dtype=dtype, device=packed.device)
    p = as_bytes(packed)
    out = torch.stack((lut[(p & 0x0F).long()], lut[(p >> 4).long()]), dim=-1)
    return out.flatten(-2)


def e8m0_to_float(s: torch.Tensor) -> torch.Tensor:
    """uint8 e8m0 exponents -> float32 ``2 ** (s - 127)`` (255 is NaN, as the OCP MX spec says)."""
    s = as_bytes(s)
    v = torch.exp2(s.float() - 127.0)
    return torch.where(s == 255, torch.full_like(v, float("nan")), v)


def _chunks(num: int, per_expert_bytes: int, budget: int = 256 << 20):
    step = max(1, budget // max(1, per_expert_bytes))
    for a in range(0, num, step):
        yield a, min(num, a + step)


def dequantize(weight: torch.Tensor, scale: torch.Tensor | None, fmt: str | None = None, *,
               block_size: Sequence[int] = DEFAULT_BLOCK_SIZE, dtype: torch.dtype = torch.bfloat16,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Real-valued weights ``[E, N, K]`` (or ``[N, K]``) from quantized ones: the reference.

    Parameters
    ----------
    weight, scale, fmt, block_size
        As :func:`check_format` (checked here).
    dtype : torch.dtype
        Of the result. The math is float32, rounded once.
    out : torch.Tensor, optional
        ``[E, N, K]`` of ``dtype`` on the weight's device, written in place (e.g. one buffer for
        several pieces).

    Returns
    -------
    torch.Tensor
        On the weight's device; a copy, never a view. CUDA: one memory-bound Triton pass where it
        runs (:func:`dwdp_comm.kernels.triton_quant.dequantize`). Otherwise (the torch code, the
        CPU reference) experts are converted a few at a time, so
        float32 temporaries stay near 256 MiB. Enqueued on the current stream (no host wait).
    """
    fmt = check_format(weight, scale, fmt, block_size=block_size)
    one = weight.dim() == 2
    if one:
        weight, scale = weight.unsqueeze(0), None if scale is None else scale.unsqueeze(0)
    e, n = int(weight.shape[0]), int(weight.shape[1])
    k = logical_k(fmt, weight)
    if out is None:
        out = torch.empty(e, n, k, dtype=dtype, device=weight.device)
    elif tuple(out.shape) != (e, n, k) or out.dtype != dtype or out.device != weight.device:
        raise bad_arg("out", _tensor_text(out), f"{dtype} [{e}, {n}, {k}] on {weight.device}")
    if fmt == "bf16":
        out.copy_(weight)
        return out[0] if one else out
    bn, bk = check_block_size(block_size)
    if weight.is_cuda and _gpu_pass(weight, scale, fmt, out, (bn, bk)):
        return out[0] if one else out
    for a, b in _chunks(e, n * k * 4):
        q = weight[a:b]
        if fmt == "fp8_channel":
            w = q.float() * scale[a:b].float().unsqueeze(-1)
        elif fmt == "fp8_block":
            s = scale[a:b].float().repeat_interleave(bn, dim=1)[:, :n].repeat_interleave(bk, dim=2)[:, :, :k]
            w = q.float() * s
        else:  # mxfp4
            vals = decode_e2m1(q)                                  # [c, N, K]
            s = e8m0_to_float(scale[a:b])                          # [c, N, K/32]
            w = (vals.view(b - a, n, k // MXFP4_GROUP, MXFP4_GROUP) * s.unsqueeze(-1)).view(b - a, n, k)
        out[a:b].copy_(w)
    return out[0] if one else out


def _gpu_pass(weight, scale, fmt: str, out: torch.Tensor, block_size: tuple) -> bool:
    """The one-pass Triton kernel on CUDA (:func:`dwdp_comm.kernels.triton_quant.dequantize`); False
    where it does not run here (no Triton, strides it does not take): the torch code then runs."""
    from ..errors import BackendUnavailableError
    from . import triton_quant
    if triton_quant.unavailable_reason(weight.device, "mxfp4" if fmt == "mxfp4" else "fp8_block"):
        return False
    if fmt == "mxfp4":
        weight, scale = as_bytes(weight), as_bytes(scale)
    try:
        triton_quant.dequantize(weight, scale, fmt, out, block_size)
    except BackendUnavailableError:
        return False
    return True


def _e2m1_codes(v: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 code (uint8 0..15) of float32 values already scaled into [-6, 6]."""
    mags = torch.tensor(E2M1_VALUES[:8], dtype=torch.float32, device=v.device)
    idx = (v.abs().unsqueeze(-1) - mags).abs().argmin(dim=-1).to(torch.uint8)
    return idx | ((v < 0).to(torch.uint8) << 3)


def quantize(w: torch.Tensor, fmt: str, *, block_size: Sequence[int] = DEFAULT_BLOCK_SIZE
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Quantize real weights ``[E, N, K]`` (``"nk"``) to ``fmt``: ``(weight, scale)`` as the formats store.

    ``fp8_*``: scale = amax / 448 per channel / per block (all-zero blocks get 1), values rounded
    to nearest. ``mxfp4``: the scale exponent is the smallest with ``amax / 2**e <= 6`` per group of
    32, values rounded to the nearest e2m1 value. For seeded test and benchmark weights (not tuned
    for speed: float32 temporaries of the whole tensor).
    """
    fmt = check_format_name(fmt)
    if not isinstance(w, torch.Tensor) or w.dim() != 3 or not w.is_floating_point():
        raise bad_arg("w", _tensor_text(w), "a floating-point [E, N, K] tensor")
    if fmt == "bf16":
        return w, None
    e, n, k = (int(d) for d in w.shape)
    x = w.float()
    if fmt == "fp8_channel":
        s = (x.abs().amax(dim=2) / FP8_MAX).clamp_min(1e-12)
        s = torch.where(x.abs().amax(dim=2) > 0, s, torch.ones_like(s))
        return (x / s.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), s
    if fmt == "fp8_block":
        bn, bk = check_block_size(block_size)
        nb, kb = -(-n // bn), -(-k // bk)
        pad = torch.zeros(e, nb * bn, kb * bk, dtype=torch.float32, device=w.device)
        pad[:, :n, :k] = x
        amax = pad.view(e, nb, bn, kb, bk).abs().amax(dim=(2, 4))
        s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        full = s.repeat_interleave(bn, 1)[:, :n].repeat_interleave(bk, 2)[:, :, :k]
        return (x / full).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), s.contiguous()
    if k % MXFP4_GROUP:
        raise bad_arg("w", _tensor_text(w), f"K a multiple of {MXFP4_GROUP} for mxfp4")
    g = x.view(e, n, k // MXFP4_GROUP, MXFP4_GROUP)
    amax = g.abs().amax(dim=-1)
    exp = torch.ceil(torch.log2(amax.clamp_min(2.0 ** -126) / 6.0)).clamp(-127, 127)
    codes = _e2m1_codes(g / torch.exp2(exp).unsqueeze(-1)).view(e, n, k)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()
    return packed, (exp + 127).to(torch.uint8).contiguous()

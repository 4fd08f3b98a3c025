"""What the torch grouped ops can do on a device: probed once per device and dtype, cached.

Every probe runs a tiny ``torch._grouped_mm`` / ``torch._scaled_grouped_mm`` on the device the
first time it is asked (one small host wait for the probe's value), then answers from a cache.
A first question while a CUDA graph captures raises :class:`~dwdp_comm.errors.GraphCaptureError`
(the probe's wait would break the capture): run the call once eagerly first, as warm-up.
"""

from __future__ import annotations

import functools

import torch

from ..errors import GraphCaptureError
from .problem import FP8_DTYPE

__all__ = ["grouped_mm_unavailable_reason", "grouped_mm_supported", "has_device_kernel",
           "fp8_unavailable_reason", "operand_ok", "fp8_operand_ok"]


_ANSWERS: dict = {}  # (probe, device type, index, dtype) -> answer


def _asked(probe, *key):
    """``probe(*key)``, run once per key; never run while the current CUDA stream captures."""
    full = (probe.__name__, *key)
    if full not in _ANSWERS:
        if key[0] == "cuda" and torch.cuda.is_current_stream_capturing():
            raise GraphCaptureError(
                f"dwdp_comm.kernels: the first grouped GEMM on {key[0]}:{key[1]} with these weights ({probe.__name__}"
                f"{key[2:]}) probes the device, a host wait that a CUDA graph capture cannot contain; run the "
                "forward once eagerly before capturing (warm-up, as torch.cuda.graph asks)")
        _ANSWERS[full] = probe(*key)
    return _ANSWERS[full]


def _probe(device_type: str, index: int | None, dtype: torch.dtype) -> str | None:
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    dev = torch.device(device_type, index) if index is not None else torch.device(device_type)
    try:
        a = torch.ones(16, 16, dtype=dtype, device=dev)
        b = torch.ones(2, 16, 16, dtype=dtype, device=dev)
        offs = torch.tensor([8, 16], dtype=torch.int32, device=dev)
        y = torch._grouped_mm(a, b, offs=offs)
        if device_type != "meta" and float(y[0, 0]) != 16.0:  # meta: shapes only (tracing, tests)
            return "torch._grouped_mm returned a wrong value on a probe"
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        return f"torch._grouped_mm({dtype}) fails on {device_type}: {str(exc).splitlines()[0][:200]}"
    return None


def grouped_mm_unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when ``torch._grouped_mm`` runs for ``dtype`` on ``device``, else why not (probed once, cached)."""
    device = torch.device(device)
    return _asked(_probe, device.type, device.index, dtype)


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """True when ``torch._grouped_mm`` runs for ``dtype`` on ``device`` (probed once, cached)."""
    return grouped_mm_unavailable_reason(device, dtype) is None


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int | None) -> tuple:
    return torch.cuda.get_device_capability(index)


def has_device_kernel(device: torch.device, dtype: torch.dtype) -> bool:
    """True unless ``torch._grouped_mm`` would take torch's own fallback on this CUDA device.

    On CUDA, torch runs its CUTLASS grouped kernel for bf16 on sm90 / sm100 only; every other
    case (float32, older GPUs) goes through a fallback that copies ``offs`` to the host (a sync)
    and then runs one ``mm`` per group: :func:`dwdp_comm.kernels.torch_path.run` prefers its own
    per-expert loop there, the same work without the sync. Other device types (CPU, meta) have
    no sync to avoid: True.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return True
    return dtype == torch.bfloat16 and _cuda_capability(device.index)[0] in (9, 10)


def _fp8_probe(device_type: str, index: int | None) -> str | None:
    if not hasattr(torch, "_scaled_grouped_mm"):
        return f"torch {torch.__version__} has no torch._scaled_grouped_mm"
    if device_type != "cuda":
        return f"torch._scaled_grouped_mm has no {device_type} kernel (CUDA sm90+ only)"
    dev = torch.device(device_type, index)
    try:
        a = torch.ones(32, 32, device=dev).to(FP8_DTYPE)
        b = torch.ones(2, 32, 32, device=dev).to(FP8_DTYPE).transpose(-1, -2)
        y = torch._scaled_grouped_mm(a, b, torch.ones(32, device=dev), torch.ones(2, 32, device=dev),
                                     offs=torch.tensor([16, 32], dtype=torch.int32, device=dev),
                                     out_dtype=torch.bfloat16)
        if float(y[0, 0]) != 32.0:
            return "torch._scaled_grouped_mm returned a wrong value on a probe"
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        return f"torch._scaled_grouped_mm fails on {dev}: {str(exc).splitlines()[0][:200]}"
    return None


def fp8_unavailable_reason(device: torch.device) -> str | None:
    """None when fp8 grouped GEMM (``torch._scaled_grouped_mm``) runs on ``device``, else why not."""
    device = torch.device(device)
    return _asked(_fp8_probe, device.type, device.index if device.type == "cuda" else None)


def operand_ok(t: torch.Tensor) -> bool:
    """True when ``t`` meets ``torch._grouped_mm``'s layout rules (16-byte strides and base)."""
    if t.numel() == 0:
        return True
    align = 16 // t.element_size()
    s, sh = t.stride(), t.shape
    if t.data_ptr() % 16:
        return False
    if s[-1] == 1 and s[-2] >= max(1, sh[-1]):
        lead = s[-2]
    elif s[-2] == 1 and s[-1] >= max(1, sh[-2]):
        lead = s[-1]
    else:
        return False
    if lead % align:
        return False
    return t.dim() == 2 or s[0] % align == 0 or sh[0] == 1


def fp8_operand_ok(w: torch.Tensor) -> bool:
    """True when fp8 weights ``w`` suit ``torch._scaled_grouped_mm``: K-contiguous (``[E, N, K]``
    storage passed as ``w.transpose(-1, -2)``) and :func:`operand_ok`."""
    s = w.stride()
    return s[-2] == 1 and s[-1] > 1 and operand_ok(w)

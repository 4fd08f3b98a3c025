"""Torch fast path: ``torch._grouped_mm`` / ``torch._scaled_grouped_mm`` over weight pieces.

Methods (``info["method"]`` says which ran):

``grouped_mm``
    One weight tensor (contiguous, or a composite view: one virtual range whose pages come from
    several buffers): a single ``torch._grouped_mm`` call. This is the route DWDP prefers.
``segments``
    Split weights: one ``torch._grouped_mm`` per piece on that piece's rows of ``x`` (a view).
    The first piece is run on the whole of ``x`` with only its own groups, so the op allocates the
    full ``[T, N]`` result and fills the first piece's rows; the other pieces' results are copied
    into place (``torch._grouped_mm`` has no ``out=``). Pieces of a single expert run as
    ``torch.mm(..., out=rows)`` with no copy. Weights are never merged.
``segments_async``
    As ``segments``, but on CUDA each copy runs on a side stream while the next piece's GEMM runs
    (the current stream waits for the copies before returning).
``per_expert``
    ``torch.mm(x_rows, w_e, out=out_rows)`` for every expert with tokens. Also the fallback for
    pieces whose strides or alignment ``torch._grouped_mm`` rejects (its operands need 16-byte
    aligned strides and base pointers), for dtypes it lacks on the device, and for old torch.

fp8 (e4m3) weights run through ``torch._scaled_grouped_mm`` (``grouped_mm`` or ``segments``;
x is quantized per row, weights carry per-output-channel float32 scales and must be K-contiguous:
store ``[E, N, K]`` and pass ``w.transpose(-1, -2)``). Where that op is missing (CPU builds, GPUs
below sm90) :func:`fp8_unavailable_reason` says why.

Streams: everything is enqueued on the current stream of ``x``'s device; the host never waits, except
once per device and dtype for a tiny capability probe.
"""

from __future__ import annotations

import functools

import torch

from ..errors import BackendUnavailableError, bad_arg
from ._inputs import FP8_DTYPE, Problem
from .reference import quantize_rowwise

__all__ = ["run", "run_rows", "METHODS", "grouped_mm_supported", "fp8_unavailable_reason", "operand_ok"]

METHODS = ("auto", "grouped_mm", "segments", "segments_async", "per_expert")


@functools.lru_cache(maxsize=None)
def _probe(device_type: str, index: int | None, dtype: torch.dtype) -> str | None:
    """None when ``torch._grouped_mm`` runs for ``dtype`` on the device, else why not."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    dev = torch.device(device_type, index) if index is not None else torch.device(device_type)
    try:
        a = torch.ones(16, 16, dtype=dtype, device=dev)
        b = torch.ones(2, 16, 16, dtype=dtype, device=dev)
        offs = torch.tensor([8, 16], dtype=torch.int32, device=dev)
        y = torch._grouped_mm(a, b, offs=offs)
        if float(y[0, 0]) != 16.0:
            return "torch._grouped_mm returned a wrong value on a probe"
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        return f"torch._grouped_mm({dtype}) fails on {device_type}: {str(exc).splitlines()[0][:200]}"
    return None


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """True when ``torch._grouped_mm`` runs for ``dtype`` on ``device`` (probed once, cached)."""
    device = torch.device(device)
    return _probe(device.type, device.index, dtype) is None


@functools.lru_cache(maxsize=None)
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
    return _fp8_probe(device.type, device.index if device.type == "cuda" else None)


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


def _fp8_ok(w: torch.Tensor) -> bool:
    s = w.stride()
    return s[-2] == 1 and s[-1] > 1 and operand_ok(w)


def run(p: Problem, method: str = "auto", info: dict | None = None) -> torch.Tensor:
    """Run ``p`` with torch ops; see the module docstring for the methods.

    Parameters
    ----------
    p : Problem
    method : str
        One of :data:`METHODS`. ``"auto"``: ``grouped_mm`` for one piece, ``segments`` for
        several, falling back to ``per_expert`` where ``torch._grouped_mm`` cannot run.
    info : dict, optional
        Receives ``method`` (what ran) and, where a fallback happened, ``fallback`` (why).

    Returns
    -------
    torch.Tensor
        ``[T, N]`` in ``x``'s dtype (``p.out`` when given).

    Raises
    ------
    BackendUnavailableError
        fp8 weights where ``torch._scaled_grouped_mm`` cannot run, or a forced method that cannot.
    """
    if method not in METHODS:
        raise bad_arg("method", method, f"one of {METHODS}")
    info = {} if info is None else info
    if p.num_tokens == 0:
        info["method"] = "empty"
        return p.out if p.out is not None else p.x.new_empty(0, p.N)
    if p.is_fp8:
        return _run_fp8(p, method, info)
    can_group = grouped_mm_supported(p.device, p.x.dtype)
    if method == "per_expert" or not can_group:
        if not can_group:
            if method in ("grouped_mm", "segments", "segments_async"):
                raise BackendUnavailableError(f"method={method!r}: {_probe_reason(p)}")
            info["fallback"] = _probe_reason(p)
        info["method"] = "per_expert"
        return _per_expert(p, _output(p))
    if method == "grouped_mm" and len(p.pieces) != 1:
        raise bad_arg("method", method, f"'segments' or 'per_expert' for {len(p.pieces)} weight pieces "
                      "(grouped_mm needs one [E, K, N] tensor)")
    if not operand_ok(p.x):
        info["fallback"] = f"x strides {p.x.stride()} / alignment rejected by torch._grouped_mm"
        info["method"] = "per_expert"
        return _per_expert(p, _output(p))
    info["method"] = "grouped_mm" if len(p.pieces) == 1 else \
        ("segments_async" if method == "segments_async" else "segments")
    return _segments(p, info, overlap=method == "segments_async")


def run_rows(p: Problem, consume, info: dict | None = None) -> None:
    """Compute ``p`` piece by piece and hand each piece's rows to ``consume`` (no assembly copy).

    ``consume(r0, r1, y)`` receives ``y`` = rows ``[r0, r1)`` of the result (``[r1 - r0, N]``,
    x's dtype), in row order, on the current stream; pieces without tokens are skipped. Used by
    :func:`dwdp_comm.kernels.moe_mlp` to apply SwiGLU straight from each piece's gate-up result.
    """
    info = {} if info is None else info
    if p.is_fp8:
        why = fp8_unavailable_reason(p.device)
        if why:
            raise BackendUnavailableError(f"fp8 weights: {why}")
        xq, xs = (p.x, p.x_scales) if p.x_scales is not None else quantize_rowwise(p.x)
        x, fp8 = xq, True
    else:
        x, fp8 = p.x, False
        xs = None
    grouped = fp8 or (grouped_mm_supported(p.device, p.x.dtype) and operand_ok(p.x))
    info["method"] = "scaled_rows" if fp8 else ("grouped_mm_rows" if grouped else "per_expert_rows")
    g = p.groups
    for pi, (first, w) in enumerate(p.pieces):
        n = int(w.shape[0])
        r0, r1 = g.rows(first, first + n)
        if r1 == r0:
            continue
        offs = _piece_offsets(p, first, n, r0)
        if fp8:
            if not _fp8_ok(w):
                raise BackendUnavailableError("fp8 weights must be K-contiguous: store [E, N, K], pass "
                                              "w.transpose(-1, -2)")
            y = torch._scaled_grouped_mm(x[r0:r1], w, xs[r0:r1], p.scales[pi], offs=offs, out_dtype=torch.bfloat16)
        elif grouped and operand_ok(w):
            y = torch._grouped_mm(x[r0:r1], w, offs=offs)
        else:
            y = torch.empty(r1 - r0, p.N, dtype=p.out_dtype, device=p.device)
            for i in range(n):
                a, b = int(g.starts[first + i]) - r0, int(g.ends[first + i]) - r0
                if b > a:
                    torch.mm(x[r0 + a:r0 + b], w[i], out=y[a:b])
        consume(r0, r1, y)


def _probe_reason(p: Problem) -> str:
    d = p.device
    return _probe(d.type, d.index, p.x.dtype) or ""


def _output(p: Problem) -> torch.Tensor:
    return p.out if p.out is not None else torch.empty(p.num_tokens, p.N, dtype=p.out_dtype, device=p.device)


def _piece_offsets(p: Problem, first: int, count: int, r0: int) -> torch.Tensor:
    offs = p.groups.device_offsets(p.device)[first:first + count]
    return offs - r0 if r0 else offs


class _Copier:
    """Copies piece results into place: inline, or on a side stream that overlaps the next GEMM."""

    _streams: dict = {}

    def __init__(self, device: torch.device, overlap: bool):
        self.device, self.side, self.used = device, None, False
        if overlap and device.type == "cuda":
            key = device.index if device.index is not None else torch.cuda.current_device()
            self.side = self._streams.get(key)
            if self.side is None:
                self.side = self._streams[key] = torch.cuda.Stream(device=key)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if self.side is None:
            dst.copy_(src)
            return
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            dst.copy_(src)
        src.record_stream(self.side)  # src is freed by the caller while the side stream reads it
        dst.record_stream(self.side)
        self.used = True

    def finish(self) -> None:
        if self.used:
            torch.cuda.current_stream(self.device).wait_stream(self.side)


def _segments(p: Problem, info: dict, mm=None, xq=None, overlap: bool = False) -> torch.Tensor:
    """Run each piece with one grouped call; the first piece's call allocates the result."""
    mm = mm or (lambda a, w, offs, pi, r0: torch._grouped_mm(a, w, offs=offs))
    copier = _Copier(p.device, overlap)
    x = p.x if xq is None else xq
    g = p.groups
    out = p.out
    fallbacks = []
    for pi, (first, w) in enumerate(p.pieces):
        n = int(w.shape[0])
        r0, r1 = g.rows(first, first + n)
        grouped_ok = (_fp8_ok(w) if xq is not None else operand_ok(w))
        if not grouped_ok and xq is None:
            fallbacks.append(f"experts {first}..{first + n - 1}: weight strides {tuple(w.stride())}")
        if out is None and pi == 0 and grouped_ok:
            # Whole x, only this piece's groups: the op allocates [T, N] and fills rows [0, r1).
            out = mm(x, w, _piece_offsets(p, first, n, 0), pi, 0)
            continue
        if out is None:
            out = torch.empty(p.num_tokens, p.N, dtype=p.out_dtype, device=p.device)
        if r1 == r0:
            continue
        if (n == 1 or not grouped_ok) and xq is None:
            _per_expert_piece(p, out, first, w)
        elif not grouped_ok:
            raise BackendUnavailableError(
                f"fp8 weights (experts {first}..{first + n - 1}) with strides {tuple(w.stride())}: "
                "torch._scaled_grouped_mm needs K-contiguous weights; store them as [E, N, K] and pass "
                "w.transpose(-1, -2)")
        else:
            copier.copy(out[r0:r1], mm(x[r0:r1], w, _piece_offsets(p, first, n, r0), pi, r0))
    copier.finish()
    if fallbacks:
        info["fallback"] = "per-expert torch.mm for " + "; ".join(fallbacks)
    if p.out is not None and out is not p.out:
        p.out.copy_(out)
        out = p.out
    return out


def _per_expert_piece(p: Problem, out: torch.Tensor, first: int, w: torch.Tensor) -> None:
    g = p.groups
    for i in range(int(w.shape[0])):
        r0, r1 = int(g.starts[first + i]), int(g.ends[first + i])
        if r1 > r0:
            torch.mm(p.x[r0:r1], w[i], out=out[r0:r1])


def _per_expert(p: Problem, out: torch.Tensor) -> torch.Tensor:
    for first, w in p.pieces:
        _per_expert_piece(p, out, first, w)
    return out


def _run_fp8(p: Problem, method: str, info: dict) -> torch.Tensor:
    why = fp8_unavailable_reason(p.device)
    if why:
        raise BackendUnavailableError(f"fp8 weights: {why}; use backend='reference' (slow) or bf16 weights")
    if method == "per_expert":
        raise BackendUnavailableError("method='per_expert' does not support fp8 weights")
    if method == "grouped_mm" and len(p.pieces) != 1:
        raise bad_arg("method", method, f"'segments' for {len(p.pieces)} weight pieces")
    xq, xs = (p.x, p.x_scales) if p.x_scales is not None else quantize_rowwise(p.x)

    def mm(a, w, offs, pi, r0):
        return torch._scaled_grouped_mm(a, w, xs[r0:r0 + a.shape[0]], p.scales[pi], offs=offs,
                                        out_dtype=torch.bfloat16)

    info["method"] = "scaled_grouped_mm" if len(p.pieces) == 1 else \
        ("scaled_segments_async" if method == "segments_async" else "scaled_segments")
    return _segments(p, info, mm=mm, xq=xq, overlap=method == "segments_async")

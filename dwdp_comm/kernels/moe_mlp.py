"""The routed-expert MLP over split weights: gate-up GEMM, gate (SwiGLU and others), down GEMM.

:func:`moe_mlp` runs both grouped GEMMs through :mod:`dwdp_comm.kernels.dispatch`; how the torch
path runs split weights (:func:`dwdp_comm.kernels.torch_path.split_strategy`) decides whether the
gate is applied to each piece's gate-up rows as they come or once to the assembled result.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..errors import bad_arg, bad_type
from . import torch_path, triton_moe
from .capabilities import fp8_unavailable_reason
from .dispatch import grouped_gemm, run_problem
from .problem import make_problem, normalize_weights
from .quant import DEFAULT_BLOCK_SIZE
from .token_groups import TokenGroups
from .torch_path import DIRECT_MIN_ROWS

__all__ = ["moe_mlp", "swiglu", "is_silu", "apply_gate", "GATES", "WEIGHT_LAYOUTS"]


def swiglu(h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """SwiGLU: ``silu(h[:, :I]) * h[:, I:]`` for ``h`` ``[T, 2I]`` (gate half first, then up).

    Computed in float32, returned in h's dtype (or written to ``out`` ``[T, I]``).
    """
    if not isinstance(h, torch.Tensor) or h.dim() != 2 or h.shape[1] % 2:
        raise bad_arg("h", tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__,
                      "a [num_tokens, 2 * intermediate] tensor")
    i = h.shape[1] // 2
    g, u = h[:, :i].float(), h[:, i:].float()
    a = F.silu(g).mul_(u)
    if out is not None:
        return out.copy_(a)
    return a.to(h.dtype)


GATES = ("swiglu", "swiglu_interleaved")
WEIGHT_LAYOUTS = ("kn", "nk")


def is_silu(act_fn: Any) -> bool:
    """True for SiLU given as None (the default), ``F.silu``, ``nn.SiLU`` or transformers' ``SiLUActivation``."""
    if act_fn is None or act_fn is F.silu or isinstance(act_fn, torch.nn.SiLU):
        return True
    cls = type(act_fn)
    return cls.__name__ == "SiLUActivation" and cls.__module__.startswith("transformers.")


def _check_gate(gate: Any, act_fn: Any) -> None:
    if not (gate is None or callable(gate) or (isinstance(gate, str) and gate in GATES)):
        raise bad_arg("gate", repr(gate), f"one of {GATES}, a callable [rows, N] -> [rows, I], or None")
    if act_fn is not None and not callable(act_fn):
        raise bad_type("act_fn", act_fn, "a callable (default torch.nn.functional.silu)")


def _as_kn(w: Any, layout: str, name: str) -> Any:
    """Weights in any accepted form, as logical ``[E, K, N]`` views (``"nk"``: each piece transposed)."""
    if layout == "kn":
        return w
    if isinstance(w, torch.Tensor):
        return w.transpose(-1, -2)
    if isinstance(w, (list, tuple)):
        return [(it[0], it[1].transpose(-1, -2)) if isinstance(it, tuple) and len(it) == 2 and
                isinstance(it[1], torch.Tensor) else (it.transpose(-1, -2) if isinstance(it, torch.Tensor) else it)
                for it in w]
    return w  # make_problem names the bad type


def _bias_table(b: Any, num_experts: int, n: int, like: torch.Tensor, name: str) -> torch.Tensor | None:
    """A bias in any accepted form (``[E, N]`` or pieces) as one contiguous ``[E, N]`` tensor."""
    if b is None:
        return None
    if isinstance(b, torch.Tensor):
        parts = [b]
    elif isinstance(b, (list, tuple)) and b:
        parts = [it[1] if isinstance(it, tuple) and len(it) == 2 else it for it in b]
        parts = [t.unsqueeze(0) if isinstance(t, torch.Tensor) and t.dim() == 1 else t for t in parts]
    else:
        raise bad_type(name, b, f"a [{num_experts}, {n}] tensor or pieces shaped like the weights")
    for t in parts:
        if not isinstance(t, torch.Tensor):
            raise bad_type(name, t, "torch.Tensor pieces")
        if t.dim() != 2 or int(t.shape[1]) != n or t.device != like.device or not t.is_floating_point():
            raise bad_arg(name, f"{tuple(t.shape)} {t.dtype} on {t.device}",
                          f"[count, {n}] floating-point pieces on {like.device}")
    t = parts[0] if len(parts) == 1 else torch.cat(parts)
    if int(t.shape[0]) != num_experts:
        raise bad_arg(name, f"biases for {int(t.shape[0])} experts", f"{num_experts}, as the weights")
    return t.contiguous()


def _gate_torch(h: torch.Tensor, gate: Any, act_fn: Any) -> torch.Tensor:
    """The gate in torch ops: SwiGLU forms with SiLU in float32, anything else in h's dtype."""
    if gate in GATES and is_silu(act_fn):
        if gate == "swiglu":
            return swiglu(h)
        return F.silu(h[:, 0::2].float()).mul_(h[:, 1::2].float()).to(h.dtype)
    act = F.silu if act_fn is None else act_fn
    if gate is None:
        return act(h)
    if callable(gate):
        return gate(h)
    i = h.shape[1] // 2
    if gate == "swiglu":
        return act(h[:, :i]) * h[:, i:]
    return act(h[:, 0::2]) * h[:, 1::2]


def apply_gate(h: torch.Tensor, gate: Any, act_fn: Any) -> torch.Tensor:
    """The gate of :func:`moe_mlp` in torch ops, on gate-up rows ``h`` ``[R, N]`` -> ``[R, I]`` (no bias,
    no row weights): the SwiGLU forms with SiLU in float32 rounded to h's dtype, anything else in h's dtype."""
    return _gate_torch(h, gate, act_fn)


class _Activation:
    """gate-up rows -> activation rows: bias, gate, folded row weights; Triton where it runs."""

    def __init__(self, gate, act_fn, bias, row_experts, row_weights, limit):
        self.gate, self.act_fn, self.bias, self.row_experts = gate, act_fn, bias, row_experts
        self.row_weights, self.limit = row_weights, limit
        self.method = None

    def fused(self, h: torch.Tensor) -> bool:
        """Whether the one-pass Triton kernel computes this activation for ``h``."""
        return self.gate in GATES and is_silu(self.act_fn) and h.shape[1] % 2 == 0 and h.stride(-1) == 1 and \
            triton_moe.unavailable_reason(h) is None

    def __call__(self, h: torch.Tensor, out: torch.Tensor | None, r0: int = 0, whole: bool = True) -> torch.Tensor:
        rows = int(h.shape[0])
        w = None if self.row_weights is None else self.row_weights[r0:r0 + rows]
        e = None if self.row_experts is None else self.row_experts[r0:r0 + rows]
        if self.fused(h):
            self.method = "triton"
            if out is None:
                out = torch.empty(rows, h.shape[1] // 2, dtype=h.dtype, device=h.device)
            return triton_moe.gated_activation(h, out, interleaved=self.gate == "swiglu_interleaved",
                                               limit=self.limit if whole else None,
                                               row_weights=None if w is None else w.contiguous(),
                                               bias=self.bias, row_experts=e)
        self.method = "torch"
        if self.bias is not None:
            h = h + self.bias[e].to(h.dtype)
        a = _gate_torch(h, self.gate, self.act_fn)
        if not isinstance(a, torch.Tensor) or a.dim() != 2 or a.shape[0] != rows:
            raise bad_arg("gate", f"a result of shape {tuple(a.shape) if isinstance(a, torch.Tensor) else a}",
                          f"[{rows}, intermediate] for gate-up rows of shape {tuple(h.shape)}")
        if w is not None:
            a = a * w.unsqueeze(1).to(a.dtype) if a.dtype != torch.float32 else a * w.unsqueeze(1).float()
        return a if out is None else out.copy_(a)


def moe_mlp(x: torch.Tensor, m_sizes_or_offsets: Any, w13: Any, w2: Any, *, offsets: bool = False,
            w13_scales: Any = None, w2_scales: Any = None, gate: Any = "swiglu", act_fn: Any = None,
            w13_bias: Any = None, w2_bias: Any = None, weight_layout: str = "kn",
            row_weights: torch.Tensor | None = None, ignore_tail: bool = False, backend: str = "auto",
            info: dict | None = None, direct_min_rows: int = DIRECT_MIN_ROWS, weight_format: str | None = None,
            block_size: Any = DEFAULT_BLOCK_SIZE, x_rows: torch.Tensor | None = None, x_top_k: int = 1
            ) -> torch.Tensor:
    """Routed-expert MLP over split weights: gate-up grouped GEMM, gate, down grouped GEMM.

    Parameters
    ----------
    x : torch.Tensor
        ``[T, H]`` bf16 or float32, rows grouped by expert in expert order (each routed copy of a
        token is one row; combining the top-k rows back per token is the caller's job:
        :func:`dwdp_comm.moe.combine_rows`).
    m_sizes_or_offsets : sequence, array, tensor or TokenGroups
        ``[E]`` token counts (or end offsets with ``offsets=True``), as in :func:`~dwdp_comm.kernels.dispatch.grouped_gemm`.
        Device-resident end offsets in a ``TokenGroups(..., offsets=True, validate=False)`` keep
        the whole call free of host synchronisation on one weight tensor.
    w13 : torch.Tensor or list
        Gate-up projection (the up projection alone when ``gate`` is None), or split pieces as in
        :func:`grouped_gemm`: ``[E, H, N]`` with ``weight_layout="kn"``, ``[E, N, H]`` (nn.Linear /
        Hugging Face storage) with ``"nk"``, read in place (never transposed into a copy).
        SwiGLU forms: ``N = 2I``.
    w2 : torch.Tensor or list
        Down projection: ``[E, I, H]`` (``"kn"``) or ``[E, H, I]`` (``"nk"``), or split pieces.
    w13_scales, w2_scales : optional
        Scales of quantized weights (whole or pieces), as ``weight_scales`` of
        :func:`~dwdp_comm.kernels.dispatch.grouped_gemm`: fp8 per-channel ``[E, N]`` and
        ``[E, H]``, block-fp8 ``[E, N/bn, K/bk]``, mxfp4 ``[E, N, K/32]``.
    weight_format, block_size : optional
        As :func:`~dwdp_comm.kernels.dispatch.grouped_gemm` (both projections share the format).
        Quantized weights take ``weight_layout="nk"`` storage and bf16 ``x``; the result is bf16.
    x_rows, x_top_k : optional
        The token permutation fused into the gate-up GEMM: its row ``r`` is
        ``x[x_rows[r] // x_top_k]`` (``x`` the un-permuted tokens; ``x_rows`` int64, e.g.
        :class:`dwdp_comm.moe.TokenOrder`'s ``order``). The block-FP8 quantizer reads the rows
        in place; other paths gather first (one ``index_select``).
    gate : {"swiglu", "swiglu_interleaved"}, callable or None
        ``"swiglu"``: ``act_fn(h[:, :I]) * h[:, I:]``; ``"swiglu_interleaved"``: gate in even,
        up in odd columns; a callable maps gate-up rows ``[R, N]`` to ``[R, I]``; None applies
        ``act_fn`` alone (no gate).
    act_fn : callable, optional
        Default SiLU. The SwiGLU forms with SiLU run in float32 (a fused Triton pass on CUDA);
        other activations and callables run in x's dtype.
    w13_bias, w2_bias : torch.Tensor or list, optional
        ``[E, N]`` and ``[E, H]`` biases (or pieces), added to each row's GEMM result.
    weight_layout : {"kn", "nk"}
        Storage of both weights (see ``w13``).
    row_weights : torch.Tensor, optional
        ``[T]`` factor per row (the routing weight of each sorted copy): folded into the
        activation before the down GEMM when there is no ``w2_bias`` (``down(a * w) = w * down(a)``),
        else applied to the output rows.
    ignore_tail : bool
        Allow the groups to cover fewer than ``T`` rows: rows past the last group (sentinel
        copies sorted to the end) are not computed and their output rows are undefined.
    backend : str
        Used for both GEMMs.
    info : dict, optional
        Receives ``gate_up`` and ``down`` (the info of each GEMM) and ``activation``
        (``"triton"`` or ``"torch"``).
    direct_min_rows : int
        Passed to both GEMMs (:func:`~dwdp_comm.kernels.dispatch.grouped_gemm`; default
        :data:`dwdp_comm.kernels.torch_path.DIRECT_MIN_ROWS`).

    Returns
    -------
    torch.Tensor
        ``[T, H]`` in x's dtype. The intermediate ``[T, I]`` activation is rounded to x's dtype.

    Notes
    -----
    One weight tensor (contiguous or a composite view), bf16 on sm90+, device-resident offsets:
    two ``torch._grouped_mm`` calls, one activation pass, nothing else, no host sync (biases add
    one gather-add per GEMM, as Hugging Face's own path). With split bf16/float32 weights and
    the torch backend on CUDA (``segments_direct``), both GEMMs write their rows in place
    (:mod:`dwdp_comm.kernels.torch_path`), then the activation runs once as on one tensor.
    Otherwise (``"torch:segments"`` / ``"torch:segments_async"``, fp8, CPU), the activation is
    applied to each piece's gate-up rows as they come
    (:func:`dwdp_comm.kernels.torch_path.run_rows`), so the gate-up result is never
    assembled. Streams: as :func:`grouped_gemm` (on CUDA the pieces run on worker streams forked
    from the current one and joined back; ``backend="torch:segments"`` keeps everything on the
    current stream, in order).
    """
    _check_gate(gate, act_fn)
    direct_min_rows = torch_path.check_direct_min_rows(direct_min_rows)  # before any GEMM runs
    if weight_layout not in WEIGHT_LAYOUTS:
        raise bad_arg("weight_layout", repr(weight_layout), f"one of {WEIGHT_LAYOUTS} ([E, K, N] or [E, N, K] storage)")
    if not isinstance(ignore_tail, bool):
        raise bad_type("ignore_tail", ignore_tail, "a bool")
    w13, w2 = _as_kn(w13, weight_layout, "w13"), _as_kn(w2, weight_layout, "w2")
    groups = m_sizes_or_offsets if isinstance(m_sizes_or_offsets, TokenGroups) else \
        TokenGroups(m_sizes_or_offsets, offsets=offsets)
    i1, i2 = {}, {}
    p13 = make_problem(x, groups, w13, weight_scales=w13_scales, ignore_tail=ignore_tail,
                       weight_format=weight_format, block_size=block_size, x_rows=x_rows, x_top_k=x_top_k)
    rows = p13.num_tokens
    if row_weights is not None:
        if not isinstance(row_weights, torch.Tensor) or tuple(row_weights.shape) != (rows,) or \
                row_weights.device != x.device or not row_weights.is_floating_point():
            got = (f"{tuple(row_weights.shape)} {row_weights.dtype} on {row_weights.device}"
                   if isinstance(row_weights, torch.Tensor) else type(row_weights).__name__)
            raise bad_arg("row_weights", got, f"a floating-point [{rows}] tensor on {x.device}")
    if gate in GATES and p13.N % 2:
        raise bad_arg("w13", f"N = {p13.N}", f"an even N = 2 * intermediate for gate={gate!r}")
    E = p13.num_experts
    b13 = _bias_table(w13_bias, E, p13.N, x, "w13_bias")
    b2 = None
    if w2_bias is not None:
        n2 = normalize_weights(w2, "w2")[0][1]
        b2 = _bias_table(w2_bias, E, int(n2.shape[-1]), x, "w2_bias")
    row_e = None
    if w2_bias is not None or b13 is not None:
        offs = groups.device_offsets(x.device)
        row_e = torch.searchsorted(offs, torch.arange(rows, device=x.device, dtype=torch.int32), right=True)
        row_e = row_e.clamp_(max=E - 1)
    fold = row_weights is not None and w2_bias is None
    limit = groups.device_offsets(x.device)[-1:] if ignore_tail else None
    act = _Activation(gate, act_fn, b13, row_e, row_weights if fold else None, limit)
    method = backend.partition(":")[2] or "auto"  # the same streams rule as the down GEMM's
    if len(p13.pieces) > 1 and p13.fmt in ("bf16", "fp8_channel") and \
            backend in ("auto", "torch", "torch:segments", "torch:segments_async") and \
            torch_path.split_strategy(method, p13.device, fp8=p13.is_fp8) != "direct" and \
            not (p13.is_fp8 and fp8_unavailable_reason(p13.device)):
        # Split weights, no direct writes: the activation straight from each piece's gate-up rows
        # (no [T, N] assembly copy). With segments_direct (auto on CUDA) the gate-up result lands
        # in place anyway: one [T, N] result, then the activation, as on one tensor.
        p13 = p13.gathered()
        width = p13.N if gate is None else p13.N // 2
        a = torch.empty(rows, width, dtype=x.dtype, device=x.device)  # before the workers fork

        def consume(r0, r1, y):
            res = act(y, a[r0:r1] if act.fused(y) else None, r0, whole=False)
            if res.data_ptr() != a[r0:r1].data_ptr() or res.shape[1] != width:
                if res.dim() != 2 or res.shape[1] != width:
                    raise bad_arg("gate", f"a result of width {res.shape[-1]}", f"{width} (gate-up N = {p13.N})")
                a[r0:r1].copy_(res)

        torch_path.run_rows(p13, consume, info=i1, overlap=torch_path.split_strategy(method, p13.device) != "serial")
        i1["backend"] = "torch"
    else:
        a = act(run_problem(p13, backend, i1, direct_min_rows=direct_min_rows), None)
    if a.dtype != p13.out_dtype:  # a callable gate may promote; the down GEMM takes x's (or bf16 for fp8) dtype
        a = a.to(p13.out_dtype)
    y = grouped_gemm(a, groups, w2, weight_scales=w2_scales, backend=backend, info=i2, ignore_tail=ignore_tail,
                     direct_min_rows=direct_min_rows, weight_format=p13.fmt, block_size=p13.block_size)
    if b2 is not None:
        y.add_(b2[row_e].to(y.dtype))
        if row_weights is not None:
            y.mul_(row_weights.unsqueeze(1))
    if info is not None:
        info.update(gate_up=i1, down=i2, activation=act.method)
    return y

"""One projection of the routed experts (gate-up or down): weight pieces, their scales, their format.

:func:`dwdp_comm.moe.experts_forward` normalises each projection once into a :class:`Projection`
(through the one normaliser of weight pieces, :func:`dwdp_comm.kernels.problem.normalize_weights`),
then its engines only slice, merge and hand the pieces on. Nothing here copies weights, except
:meth:`Projection.dequantized` (the fallback where a format's kernel does not run).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch

from ..errors import bad_arg
from ..kernels import quant
from ..kernels.problem import align_pieces, normalize_weights, num_experts_of

__all__ = ["Projection", "bias_table"]

_SCALE_NDIM = {"fp8_channel": 2, "fp8_block": 3, "mxfp4": 3}
_SCALE_SHAPE = {"fp8_channel": "[count, N]", "fp8_block": "[count, ceil(N/bn), ceil(K/bk)]",
                "mxfp4": "[count, N, K/32]"}


@dataclass
class Projection:
    """A projection's weights as pieces, in storage layout, with one scale tensor per piece.

    Attributes
    ----------
    name : str
        ``"gate_up"`` or ``"down"`` (errors name it).
    pieces : list of (int, torch.Tensor)
        ``(first_expert, [count, N, K])`` (``layout="nk"``) or ``[count, K, N]`` (``"kn"``); mxfp4
        ``[count, N, K / 2]`` bytes.
    scales : list of torch.Tensor or None
        Quantized formats: one per piece, in the format's storage (:mod:`dwdp_comm.kernels.quant`).
    fmt : str
        One of :data:`dwdp_comm.kernels.quant.WEIGHT_FORMATS`.
    block_size : (int, int)
    layout : {"nk", "kn"}
    """

    name: str
    pieces: list
    scales: list | None
    fmt: str
    block_size: tuple
    layout: str

    @classmethod
    def build(cls, weights: Any, scales: Any, *, name: str, scale_name: str, fmt: str | None,
              block_size: Sequence[int], layout: str) -> "Projection":
        """Normalise ``weights`` (and ``scales``, split any way) and check them against ``fmt``
        (inferred from the first piece when None). Errors name ``name`` / ``scale_name``."""
        pieces = normalize_weights(weights, name, shape="[count, N, K]" if layout == "nk" else "[count, K, N]")
        bs = quant.check_block_size(block_size)
        if fmt is None:
            fmt = quant.infer_format(pieces[0][1], _first_scale(scales, pieces[0][1]), name=name,
                                     scale_name=scale_name)
        else:
            fmt = quant.check_format_name(fmt)
        if fmt != "bf16" and layout != "nk":
            raise bad_arg("weight_layout", repr(layout), f"'nk' for weight_format={fmt!r} (quantized weights are "
                          "stored [E, N, K] as nn.Linear / Hugging Face store them)")
        out = None
        if fmt == "bf16":
            if scales is not None:
                raise bad_arg(scale_name, "scales", f"None for {pieces[0][1].dtype} weights (weight_format='bf16')")
        else:
            if scales is None:
                raise bad_arg(scale_name, None, f"{_SCALE_SHAPE[fmt]} scales for the {fmt} {name} (or pieces split "
                              "like the weights)")
            sp = normalize_weights(scales, scale_name, ndim=_SCALE_NDIM[fmt], shape=_SCALE_SHAPE[fmt])
            out = align_pieces(sp, pieces, scale_name)
        for i, (first, t) in enumerate(pieces):
            where = f"experts {first}..{first + t.shape[0] - 1}"
            quant.check_format(t, None if out is None else out[i], fmt, block_size=bs, name=f"{name} ({where})",
                               scale_name=f"{scale_name} ({where})")
            if t.device != pieces[0][1].device or t.dtype != pieces[0][1].dtype or \
                    t.shape[1:] != pieces[0][1].shape[1:]:
                raise bad_arg(f"{name} ({where})", f"{t.dtype} {list(t.shape)} on {t.device}",
                              f"{pieces[0][1].dtype} [count, {', '.join(map(str, pieces[0][1].shape[1:]))}] on "
                              f"{pieces[0][1].device}, like the first piece")
        return cls(name=name, pieces=pieces, scales=out, fmt=fmt, block_size=bs, layout=layout)

    @classmethod
    def pair(cls, gate_up: Any, gate_up_scale: Any, down: Any, down_scale: Any, *, fmt: str | None,
             block_size: Sequence[int], layout: str) -> tuple["Projection", "Projection"]:
        """``(gate_up, down)`` projections of one experts call: the down projection takes the gate-up
        one's format, and both must cover the same experts (errors name the argument)."""
        p13 = cls.build(gate_up, gate_up_scale, name="gate_up", scale_name="gate_up_scale", fmt=fmt,
                        block_size=block_size, layout=layout)
        p2 = cls.build(down, down_scale, name="down", scale_name="down_scale", fmt=p13.fmt, block_size=block_size,
                       layout=layout)
        if p2.num_experts != p13.num_experts:
            raise bad_arg("down", f"{p2.num_experts} experts", f"{p13.num_experts} experts, as gate_up")
        return p13, p2

    @property
    def num_experts(self) -> int:
        return num_experts_of(self.pieces)

    @property
    def device(self) -> torch.device:
        return self.pieces[0][1].device

    @property
    def dtype(self) -> torch.dtype:
        return self.pieces[0][1].dtype

    @property
    def cuts(self) -> set:
        return {f for f, _ in self.pieces}

    def coalesced(self) -> "Projection":
        """Consecutive pieces that lie back to back in one storage (weights and scales alike) as one
        view: a composite handle's segments become one tensor again (the grouped path, no host sync)."""
        items = list(zip(self.pieces, self.scales or [None] * len(self.pieces)))
        out = [items[0]]
        for (first, t), s in items[1:]:
            (f0, t0), s0 = out[-1]
            w = _joined(t0, t)
            sc = None if s is None else _joined(s0, s)
            if w is not None and (s is None or sc is not None):
                out[-1] = ((f0, w), sc)
            else:
                out.append(((first, t), s))
        return replace(self, pieces=[p for p, _ in out], scales=None if self.scales is None else [s for _, s in out])

    def cut(self, cuts: Sequence[int]) -> "Projection":
        """Pieces re-sliced at expert boundaries ``cuts`` (views)."""
        pieces, scales = [], []
        for i, (first, t) in enumerate(self.pieces):
            n = int(t.shape[0])
            inner = [c for c in cuts if first < c < first + n]
            for a, b in zip([first] + inner, inner + [first + n]):
                pieces.append((a, t[a - first:b - first]))
                if self.scales is not None:
                    scales.append(self.scales[i][a - first:b - first])
        return replace(self, pieces=pieces, scales=scales if self.scales is not None else None)

    def dequantized(self, dtype: torch.dtype = torch.bfloat16) -> "Projection":
        """All pieces dequantized into one ``[E, N, K]`` tensor of ``dtype`` (a copy: the fallback)."""
        t0 = self.pieces[0][1]
        n, k = int(t0.shape[1]), quant.logical_k(self.fmt, t0)
        buf = torch.empty(self.num_experts, n, k, dtype=dtype, device=t0.device)
        for i, (first, t) in enumerate(self.pieces):
            quant.dequantize(t, None if self.scales is None else self.scales[i], self.fmt,
                             block_size=self.block_size, dtype=dtype, out=buf[first:first + int(t.shape[0])])
        return replace(self, pieces=[(0, buf)], scales=None, fmt="bf16")

    def kernel_weights(self) -> tuple[Any, Any]:
        """``(weights, scales)`` as :func:`dwdp_comm.kernels.moe_mlp` takes them: one tensor when
        there is one piece, else the pieces list."""
        if len(self.pieces) == 1:
            return self.pieces[0][1], None if self.scales is None else self.scales[0]
        return list(self.pieces), None if self.scales is None else list(self.scales)

    def sub(self, first: int, n: int) -> tuple[torch.Tensor, Any]:
        """``(weights, scales)`` of experts ``first .. first + n - 1``, which lie in one piece."""
        for i, (f, t) in enumerate(self.pieces):
            if f <= first and first + n <= f + int(t.shape[0]):
                s = None if self.scales is None else self.scales[i][first - f:first - f + n]
                return t[first - f:first - f + n], s
        raise bad_arg(self.name, f"experts {first}..{first + n - 1}", "experts inside one piece")


def _first_scale(scales: Any, w0: torch.Tensor) -> torch.Tensor | None:
    """The first scale in any accepted form, as a tensor with a leading expert dim, for format
    inference: a 2-D item is per-channel ``[count, N]`` when its last dim is the weights' N, else one
    expert's block scales."""
    if scales is None or isinstance(scales, torch.Tensor):
        return scales
    if isinstance(scales, (list, tuple)) and scales:
        t = scales[0][1] if isinstance(scales[0], tuple) and len(scales[0]) == 2 else scales[0]
        if isinstance(t, torch.Tensor):
            if t.dim() == 1 or (t.dim() == 2 and int(t.shape[-1]) != int(w0.shape[1])):
                return t.unsqueeze(0)
            return t
    return scales


def _joined(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """``a`` and ``b`` as one view when ``b`` starts where ``a`` ends in the same storage, else None."""
    n0 = int(a.shape[0])
    if (b.dtype == a.dtype and b.device == a.device and b.shape[1:] == a.shape[1:] and b.stride() == a.stride()
            and b.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
            and b.data_ptr() == a.data_ptr() + n0 * a.stride(0) * a.element_size()):
        return a.as_strided((n0 + int(b.shape[0]),) + tuple(a.shape[1:]), a.stride())
    return None


def bias_table(b: Any, name: str) -> torch.Tensor | None:
    """A bias given whole or as pieces (any split), as one ``[E, N]`` tensor (a view when whole or
    adjacent; the small tensors are concatenated otherwise)."""
    if b is None:
        return None
    pieces = normalize_weights(b, name, ndim=2, shape="[count, N]")
    merged = [pieces[0][1]]
    for _, t in pieces[1:]:
        j = _joined(merged[-1], t)
        if j is None:
            merged.append(t)
        else:
            merged[-1] = j
    return merged[0] if len(merged) == 1 else torch.cat(merged)

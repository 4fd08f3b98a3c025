"""Validated inputs of a grouped GEMM: token groups, weight pieces, the problem every backend runs.

Every backend receives a :class:`Problem` built by :func:`make_problem`, so argument checking and
its messages live here, once.

Conventions
-----------
- Tokens are grouped by expert in expert order: rows ``[start[e], end[e])`` of ``x`` belong to
  expert ``e``. Groups may be empty.
- Weights are logically ``[num_experts, K, N]`` (``out[rows of e] = x[rows of e] @ w[e]``). Any
  strides are accepted by the reference; the fast paths want the last or the second-to-last dim
  contiguous (``[E, K, N]`` row-major, or ``[E, N, K]`` storage passed as ``w.transpose(-1, -2)``).
- Split weights are a list of pieces ``(first_expert, tensor[count, K, N])`` covering experts
  ``0 .. E-1`` in order; they are read in place (views only, never merged).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import bad_arg, bad_type

__all__ = ["TokenGroups", "Problem", "make_problem", "normalize_weights", "upload_ints", "WEIGHT_DTYPES", "FP8_DTYPE"]

FP8_DTYPE = torch.float8_e4m3fn
WEIGHT_DTYPES = (torch.bfloat16, torch.float32, FP8_DTYPE)
_ACT_DTYPES = (torch.bfloat16, torch.float32)


class TokenGroups:
    """How many rows of ``x`` each expert owns, on the host and (cached) on devices.

    Build it once per layer and pass it to every grouped GEMM of that layer (gate-up and down):
    validation, host arrays and device offsets are then made once (:func:`dwdp_comm.kernels.moe_mlp`
    does this).

    What each input form costs (per TokenGroups, not per GEMM):

    ============================================  =========================================================
    ``values``                                    cost
    ============================================  =========================================================
    list / tuple / numpy / CPU tensor             host validation (numpy, microseconds); device offsets
                                                  uploaded on first use with one asynchronous H2D copy from
                                                  pinned memory (no host synchronisation); split weights
                                                  add one more such copy (per-piece relative offsets)
    device tensor (default ``validate=True``)     one device-to-host copy, which **synchronises** the host
                                                  with the device; then as above (int32 end offsets already
                                                  on the device are used as they are)
    device tensor, ``validate=False``             no host copy, no sync: the device offsets are derived on
                                                  the device (``cumsum`` for counts, a cast where needed;
                                                  nothing for contiguous int32 offsets). Values are trusted:
                                                  only their count is checked. The host arrays (needed by
                                                  split weights to slice ``x``, by the reference and Numba
                                                  backends, and by :meth:`rows`) are fetched on first use,
                                                  with one sync.
    ============================================  =========================================================

    Parameters
    ----------
    values : sequence of int, numpy.ndarray or torch.Tensor
        1-D integers, one per expert.
    offsets : bool
        False: ``values`` are per-expert token counts (``m_sizes``). True: cumulative end offsets
        (``offs[e]`` = end row of expert ``e``, as ``torch._grouped_mm``'s ``offs``).
    num_tokens : int, optional
        Expected total; checked when given (when the host arrays exist).
    name : str
        Argument name used in error messages.
    validate : bool
        Only for device tensors: False skips the device-to-host copy (see above).

    Attributes
    ----------
    num_experts : int
    num_tokens : int
        Total rows (host arrays: may sync for ``validate=False`` groups).
    sizes, starts, ends : numpy.ndarray
        int64 ``[num_experts]`` (same remark).
    on_host : bool
        Whether the host arrays exist (False only for ``validate=False`` groups not yet fetched).

    Notes
    -----
    CUDA graphs: call :meth:`device_offsets` / :meth:`piece_offsets` before capture; the uploads
    then happen outside the graph and the graph reads the cached device tensors.
    """

    def __init__(self, values: Any, *, offsets: bool = False, num_tokens: int | None = None,
                 name: str = "m_sizes_or_offsets", validate: bool = True):
        if not isinstance(offsets, bool):
            raise bad_type("offsets", offsets, "a bool")
        if not isinstance(validate, bool):
            raise bad_type("validate", validate, "a bool")
        self.offsets_given = offsets
        self._name = name
        self._given = values if isinstance(values, torch.Tensor) else None
        self._device_offs: dict[torch.device, torch.Tensor] = {}
        self._piece_offs: dict = {}
        self._expect_tokens = num_tokens
        self._host: tuple | None = None
        if self._given is not None and self._given.device.type != "cpu" and not validate:
            _check_int_tensor(values, name)
            if values.numel() == 0:
                raise bad_arg(name, "an empty tensor", "one entry per expert (>= 1 expert)")
            self.num_experts = int(values.shape[0])
            return
        self._set_host(_host_ints(values, name))

    # ---- host arrays ---------------------------------------------------------------------------
    def _set_host(self, arr: np.ndarray) -> None:
        name = self._name
        if arr.size == 0:
            raise bad_arg(name, "an empty array", "one entry per expert (>= 1 expert)")
        if self.offsets_given:
            if arr[0] < 0 or np.any(np.diff(arr) < 0):
                bad_at = int(np.argmax(np.diff(arr) < 0)) + 1 if arr[0] >= 0 else 0
                raise bad_arg(name, f"offsets with offs[{bad_at}]={int(arr[bad_at])} after "
                              f"{int(arr[bad_at - 1]) if bad_at else 0}",
                              "non-decreasing cumulative end offsets starting >= 0")
            ends = arr
            sizes = np.diff(arr, prepend=0)
        else:
            if np.any(arr < 0):
                e = int(np.argmax(arr < 0))
                raise bad_arg(name, f"m_sizes[{e}]={int(arr[e])}", "token counts >= 0")
            sizes = arr
            ends = np.cumsum(arr)
        sizes, ends = sizes.astype(np.int64), ends.astype(np.int64)
        self._host = (sizes, ends - sizes, ends)
        self.num_experts = int(arr.size)
        if self._expect_tokens is not None and self._expect_tokens != int(ends[-1]):
            self._raise_total(self._expect_tokens, name)

    def _fetch(self) -> tuple:
        if self._host is None:  # validate=False device values: one device-to-host copy (a sync)
            self._set_host(_host_ints(self._given, self._name))
        return self._host

    @property
    def on_host(self) -> bool:
        """Whether the host arrays exist (False only for ``validate=False`` groups not fetched yet)."""
        return self._host is not None

    @property
    def sizes(self) -> np.ndarray:
        """int64 ``[num_experts]`` token counts (fetched on first use for ``validate=False``: a sync)."""
        return self._fetch()[0]

    @property
    def starts(self) -> np.ndarray:
        """int64 ``[num_experts]`` first row of every expert (as :attr:`sizes`)."""
        return self._fetch()[1]

    @property
    def ends(self) -> np.ndarray:
        """int64 ``[num_experts]`` end row (exclusive) of every expert (as :attr:`sizes`)."""
        return self._fetch()[2]

    @property
    def num_tokens(self) -> int:
        """Total rows (as :attr:`sizes`)."""
        return int(self._fetch()[2][-1])

    def _raise_total(self, num_tokens: int, name: str) -> None:
        kind = "offsets end at" if self.offsets_given else "token counts sum to"
        hint = ""
        if not self.offsets_given and self.num_experts > 1 and np.all(np.diff(self.sizes) >= 0) \
                and self.sizes[-1] == num_tokens:
            hint = "these look like cumulative offsets: pass offsets=True"
        raise bad_arg(name, f"{kind} {self.num_tokens}", f"x.shape[0] = {num_tokens} rows", hint)

    def check(self, num_experts: int, num_tokens: int, name: str = "m_sizes_or_offsets",
              ignore_tail: bool = False) -> None:
        """Raise unless these groups describe ``num_tokens`` rows over ``num_experts`` experts.

        With ``ignore_tail`` the groups may cover fewer rows (the rest are not computed). For
        ``validate=False`` groups not yet on the host, only the expert count is checked.
        """
        if self.num_experts != num_experts:
            hint = ""
            if self.on_host and self.offsets_given and self.num_experts == num_experts + 1 and self.ends[0] == 0:
                hint = "pass the E end offsets, without the leading 0"
            raise bad_arg(name, f"{self.num_experts} entries", f"one per expert ({num_experts}, from the weights)", hint)
        if self.on_host and (self.num_tokens > num_tokens if ignore_tail else self.num_tokens != num_tokens):
            self._raise_total(num_tokens, name)

    def rows(self, first: int, stop: int) -> tuple[int, int]:
        """Row range ``[r0, r1)`` of experts ``first .. stop-1``."""
        starts, ends = self.starts, self.ends
        if stop <= first:
            r = int(starts[first]) if first < self.num_experts else int(ends[-1])
            return r, r
        return int(starts[first]), int(ends[stop - 1])

    # ---- device offsets ------------------------------------------------------------------------
    def device_offsets(self, device: Any) -> torch.Tensor:
        """int32 ``[num_experts]`` end offsets on ``device`` (made once, then cached).

        Never synchronises: an asynchronous upload from pinned host memory, or device-side
        arithmetic on device-resident values (see the class notes).
        """
        device = torch.device(device)
        t = self._device_offs.get(device)
        if t is None:
            g = self._given
            if g is not None and g.device.type != "cpu" and (self._host is None or self.offsets_given):
                # Device-resident values: derive on the device (no host round trip).
                v = g.detach()
                if self.offsets_given:
                    t = v if v.dtype == torch.int32 and v.is_contiguous() else v.to(torch.int32)
                else:
                    t = torch.cumsum(v, 0, dtype=torch.int32)
                if t.device != device:
                    t = t.to(device)
            else:
                t = upload_ints(self.ends, device)
            self._device_offs[device] = t
        return t

    def piece_offsets(self, device: Any, bounds: tuple) -> tuple:
        """Per-piece int32 end offsets, relative to each piece's first row, on ``device``.

        ``bounds`` is ``((first_expert, count), ...)``; returns one ``[count]`` tensor per piece
        (views of one buffer, uploaded once per ``bounds`` and device, then cached). A single
        piece covering every expert gets :meth:`device_offsets` itself.
        """
        device = torch.device(device)
        key = (device, bounds)
        t = self._piece_offs.get(key)
        if t is None:
            if len(bounds) == 1 and bounds[0] == (0, self.num_experts):
                t = (self.device_offsets(device),)
            else:
                starts, ends = self.starts, self.ends
                rel = np.concatenate([ends[f:f + n] - starts[f] for f, n in bounds]) if bounds else \
                    np.zeros(0, np.int64)
                flat = upload_ints(rel, device)
                t, at = [], 0
                for _, n in bounds:
                    t.append(flat[at:at + n])
                    at += n
                t = tuple(t)
            self._piece_offs[key] = t
        return t

    def __repr__(self) -> str:
        if not self.on_host:
            return f"TokenGroups(num_experts={self.num_experts}, on {self._given.device}, not validated)"
        return f"TokenGroups(num_experts={self.num_experts}, num_tokens={self.num_tokens})"


def upload_ints(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """int32 copy of host ``values`` on ``device``, without synchronising the host.

    CUDA: staged through pinned memory (torch's caching host allocator, which keeps the staging
    block until the copy has run) and copied with ``non_blocking=True``. A plain ``.to(device)``
    from pageable memory would make torch wait for the whole stream (``memcpy_and_sync``).
    """
    src = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int32))
    if device.type != "cuda":
        return src.to(device)
    staged = torch.empty(src.shape, dtype=torch.int32, pin_memory=True)
    staged.copy_(src)
    return staged.to(device, non_blocking=True)


def _check_int_tensor(values: torch.Tensor, name: str) -> None:
    if values.dim() != 1 or values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise bad_arg(name, f"a {values.dim()}-D {values.dtype} tensor", "a 1-D integer tensor")


def _host_ints(values: Any, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        _check_int_tensor(values, name)
        return values.detach().to("cpu", torch.int64).numpy()  # a device tensor: a sync
    if isinstance(values, np.ndarray):
        if values.ndim != 1 or values.dtype.kind not in "iu":
            raise bad_arg(name, f"a {values.ndim}-D {values.dtype} array", "a 1-D integer array")
        return values.astype(np.int64)
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise bad_type(name, values, "a sequence of ints, a 1-D integer numpy array or tensor, or TokenGroups")
    types = set(map(type, values))  # one C-level pass: a list of 256 ints costs microseconds
    if all(t is int or (t is not bool and issubclass(t, np.integer)) for t in types):
        return np.array(values, dtype=np.int64) if len(values) else np.zeros(0, np.int64)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise bad_arg(name, v, "ints")
    return np.array([int(v) for v in values], dtype=np.int64)  # int subclasses


def normalize_weights(weights: Any, name: str = "weights") -> list[tuple[int, torch.Tensor]]:
    """Turn any accepted weights form into pieces ``[(first_expert, tensor[count, K, N]), ...]``.

    Accepted: one ``[E, K, N]`` tensor; a list of ``(first_expert, tensor[count, K, N])``
    segments (as :meth:`dwdp_comm.PrefetchHandle.weight_segments` returns); a list of
    per-expert ``[K, N]`` and/or per-owner ``[n_i, K, N]`` tensors in expert order.
    Zero-count pieces are dropped. No data is copied.
    """
    if isinstance(weights, torch.Tensor):
        if weights.dim() != 3:
            raise bad_arg(name, f"a tensor of shape {tuple(weights.shape)}", "[num_experts, K, N] (3-D)")
        if weights.shape[0] == 0:
            raise bad_arg(name, "0 experts", "at least one expert")
        return [(0, weights)]
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise bad_type(name, weights, "a [E, K, N] tensor or a list of weight tensors / (first_expert, tensor) segments")
    if len(weights) == 0:
        raise bad_arg(name, "an empty list", "at least one weight tensor")
    segmented = [isinstance(w, tuple) for w in weights]
    if any(segmented) and not all(segmented):
        raise bad_arg(name, "a mix of (first_expert, tensor) tuples and bare tensors", "one form for the whole list")
    pieces: list[tuple[int, torch.Tensor]] = []
    nxt = 0
    for i, item in enumerate(weights):
        where = f"{name}[{i}]"
        if segmented[0]:
            if len(item) != 2:
                raise bad_arg(where, f"a tuple of length {len(item)}", "(first_expert, tensor[count, K, N])")
            first, t = item
            if isinstance(first, bool) or not isinstance(first, (int, np.integer)):
                raise bad_type(f"{where}[0]", first, "an int (first expert of the segment)")
            if not isinstance(t, torch.Tensor):
                raise bad_type(f"{where}[1]", t, "a torch.Tensor")
            if t.dim() != 3:
                raise bad_arg(f"{where}[1]", f"shape {tuple(t.shape)}", "[count, K, N] (3-D)")
            if int(first) != nxt:
                raise bad_arg(f"{where}[0]", int(first), f"{nxt} (segments must cover experts 0..E-1 in order, "
                              "without gaps or overlaps)")
        else:
            t = item
            if not isinstance(t, torch.Tensor):
                raise bad_type(where, t, "a torch.Tensor ([K, N] per expert or [count, K, N] per owner)")
            if t.dim() == 2:
                t = t.unsqueeze(0)
            elif t.dim() != 3:
                raise bad_arg(where, f"shape {tuple(t.shape)}", "[K, N] (one expert) or [count, K, N] (several)")
        if t.shape[0]:
            pieces.append((nxt, t))
        nxt += int(t.shape[0])
    if not pieces:
        raise bad_arg(name, "pieces holding 0 experts", "at least one expert")
    return pieces


@dataclass
class Problem:
    """A validated grouped GEMM: ``out[rows of e] = x[rows of e] @ w[e]`` for every expert ``e``.

    Attributes
    ----------
    x : torch.Tensor
        ``[T, K]`` bf16 or float32.
    groups : TokenGroups
    pieces : list of (int, torch.Tensor)
        Weight pieces ``(first_expert, [count, K, N])``, same dtype and device as each other.
    scales : list of torch.Tensor or None
        fp8 only: float32 ``[count, N]`` per piece (per output channel of each expert).
    out : torch.Tensor or None
        Caller's ``[T, N]`` output buffer.
    out_dtype : torch.dtype
        Dtype of the result (x's dtype; bf16 for fp8 weights).
    x_scales : torch.Tensor or None
        Pre-quantized fp8 x only: float32 ``[T]`` per-row scales.
    """

    x: torch.Tensor
    groups: TokenGroups
    pieces: list
    scales: list | None
    out: torch.Tensor | None
    out_dtype: torch.dtype
    num_experts: int
    K: int
    N: int
    x_scales: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        """Total rows (as :attr:`sizes`)."""
        return int(self.x.shape[0])

    @property
    def wdtype(self) -> torch.dtype:
        return self.pieces[0][1].dtype

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def is_fp8(self) -> bool:
        return self.wdtype == FP8_DTYPE

    def experts(self):
        """Yield ``(expert, piece_index, row_in_piece)`` for every expert in order."""
        for pi, (first, t) in enumerate(self.pieces):
            for i in range(t.shape[0]):
                yield first + i, pi, i

    def flops(self) -> int:
        return 2 * self.num_tokens * self.K * self.N


def make_problem(x: Any, m_sizes_or_offsets: Any, weights: Any, *, offsets: bool = False,
                 weight_scales: Any = None, x_scales: Any = None, out: Any = None,
                 ignore_tail: bool = False) -> Problem:
    """Validate every argument of :func:`dwdp_comm.kernels.grouped_gemm`; see it for their meaning."""
    if not isinstance(x, torch.Tensor):
        raise bad_type("x", x, "a torch.Tensor [num_tokens, K]")
    if x.dim() != 2:
        raise bad_arg("x", f"shape {tuple(x.shape)}", "[num_tokens, K] (2-D, tokens grouped by expert)")
    pieces = normalize_weights(weights)
    dev, dt = x.device, x.dtype
    K, N = int(pieces[0][1].shape[1]), int(pieces[0][1].shape[2])
    for first, t in pieces:
        where = f"weights (experts {first}..{first + t.shape[0] - 1})"
        if t.device != dev:
            raise bad_arg(where, f"a tensor on {t.device}", f"weights on x's device {dev}",
                          "move the weights or x; grouped_gemm never copies weights")
        if t.dtype not in WEIGHT_DTYPES:
            raise bad_arg(where, f"dtype {t.dtype}", f"one of {[str(d) for d in WEIGHT_DTYPES]}")
        if t.dtype != pieces[0][1].dtype:
            raise bad_arg(where, f"dtype {t.dtype}", f"the dtype of the other pieces ({pieces[0][1].dtype})")
        if (int(t.shape[1]), int(t.shape[2])) != (K, N):
            raise bad_arg(where, f"[K, N] = {list(t.shape[1:])}", f"[{K}, {N}] like the first piece")
    E = pieces[-1][0] + int(pieces[-1][1].shape[0])
    wdt = pieces[0][1].dtype
    if dt == FP8_DTYPE:
        if wdt != FP8_DTYPE:
            raise bad_arg("x", f"dtype {dt}", f"the weights' dtype {wdt} (fp8 x needs fp8 weights)")
        if not isinstance(x_scales, torch.Tensor) or x_scales.dtype != torch.float32 or \
                tuple(x_scales.shape) != (int(x.shape[0]),) or x_scales.device != dev or not x_scales.is_contiguous():
            got = (f"{tuple(x_scales.shape)} {x_scales.dtype} on {x_scales.device}"
                   if isinstance(x_scales, torch.Tensor) else x_scales)
            raise bad_arg("x_scales", got, f"a contiguous float32 [{int(x.shape[0])}] tensor on {dev} "
                          "(per-row scales of the fp8 x)")
    elif x_scales is not None:
        raise bad_arg("x_scales", "scales", f"None for {dt} x (x_scales go with a pre-quantized fp8 x)")
    elif dt not in _ACT_DTYPES:
        raise bad_arg("x", f"dtype {dt}", "torch.bfloat16 or torch.float32 (or float8_e4m3fn with x_scales)")
    if wdt == FP8_DTYPE:
        if dt not in (torch.bfloat16, FP8_DTYPE):
            raise bad_arg("x", f"dtype {dt}", "torch.bfloat16 with fp8 weights (x is quantized per row inside), "
                          "or float8_e4m3fn with x_scales")
    elif wdt != dt:
        raise bad_arg("x", f"dtype {dt}", f"the weights' dtype {wdt}", "cast x or the weights; no mixed dtypes")
    if int(x.shape[1]) != K:
        raise bad_arg("x", f"shape {tuple(x.shape)}", f"[num_tokens, K={K}] (K from the weights)")
    groups = m_sizes_or_offsets if isinstance(m_sizes_or_offsets, TokenGroups) else \
        TokenGroups(m_sizes_or_offsets, offsets=offsets)
    if not isinstance(ignore_tail, bool):
        raise bad_type("ignore_tail", ignore_tail, "a bool")
    groups.check(E, int(x.shape[0]), ignore_tail=ignore_tail)
    scales = _normalize_scales(weight_scales, pieces, N) if wdt == FP8_DTYPE else None
    if wdt != FP8_DTYPE and weight_scales is not None:
        raise bad_arg("weight_scales", "scales", f"None for {wdt} weights (scales are for fp8 weights only)")
    odt = torch.bfloat16 if wdt == FP8_DTYPE else dt
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise bad_type("out", out, "a torch.Tensor or None")
        want = (int(x.shape[0]), N)
        if tuple(out.shape) != want or out.dtype != odt or out.device != dev:
            raise bad_arg("out", f"{tuple(out.shape)} {out.dtype} on {out.device}", f"{want} {odt} on {dev}")
        if not out.is_contiguous():
            raise bad_arg("out", f"strides {out.stride()}", "a contiguous tensor")
    return Problem(x=x, groups=groups, pieces=pieces, scales=scales, out=out, out_dtype=odt,
                   num_experts=E, K=K, N=N, x_scales=x_scales)


def _scale_pieces(scales: Any, name: str) -> list[tuple[int, torch.Tensor]]:
    """Scales in any accepted form as ``[(first_expert, tensor[count, N]), ...]``."""
    if isinstance(scales, torch.Tensor):
        if scales.dim() != 2:
            raise bad_arg(name, f"shape {tuple(scales.shape)}", "[num_experts, N]")
        return [(0, scales)]
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence) or not len(scales):
        raise bad_type(name, scales, "a [E, N] float32 tensor or a non-empty list shaped like the weights")
    out, nxt = [], 0
    for i, item in enumerate(scales):
        first, s = item if isinstance(item, tuple) and len(item) == 2 else (nxt, item)
        if not isinstance(s, torch.Tensor) or s.dim() not in (1, 2):
            raise bad_arg(f"{name}[{i}]", type(s).__name__ if not isinstance(s, torch.Tensor) else
                          f"shape {tuple(s.shape)}", "[N] (one expert) or [count, N]")
        if first != nxt:
            raise bad_arg(f"{name}[{i}][0]", first, f"{nxt} (pieces must cover experts in order)")
        s = s.unsqueeze(0) if s.dim() == 1 else s
        out.append((nxt, s))
        nxt += int(s.shape[0])
    return out


def _normalize_scales(scales: Any, pieces: list, N: int) -> list[torch.Tensor]:
    """One float32 ``[count, N]`` scale tensor per weight piece (views when the splits match)."""
    name = "weight_scales"
    if scales is None:
        raise bad_arg(name, None, "float32 per-row scales ([E, N], or pieces like the weights) for fp8 weights")
    sp = _scale_pieces(scales, name)
    E = pieces[-1][0] + int(pieces[-1][1].shape[0])
    total = sp[-1][0] + int(sp[-1][1].shape[0])
    if total != E:
        raise bad_arg(name, f"scales for {total} experts", f"scales for the weights' {E} experts")
    if [(f, int(s.shape[0])) for f, s in sp] == [(f, int(t.shape[0])) for f, t in pieces]:
        out = [s for _, s in sp]
    else:  # split differently from the weights: stack the (small) scales once, then slice
        flat = sp[0][1] if len(sp) == 1 else torch.cat([s for _, s in sp])
        out = [flat[first:first + t.shape[0]] for first, t in pieces]
    for (first, t), s in zip(pieces, out):
        where = f"{name} (experts {first}..{first + t.shape[0] - 1})"
        if s.dtype != torch.float32:
            raise bad_arg(where, f"dtype {s.dtype}", "torch.float32")
        if s.device != t.device:
            raise bad_arg(where, f"a tensor on {s.device}", f"the weights' device {t.device}")
        if tuple(s.shape) != (t.shape[0], N):
            raise bad_arg(where, f"shape {tuple(s.shape)}", f"[{t.shape[0]}, {N}] (one scale per output channel)")
    return out

"""Token groups: which rows of ``x`` belong to each expert, on the host and (cached) on devices.

Tokens are grouped by expert in expert order: rows ``[start[e], end[e])`` of ``x`` belong to
expert ``e``; groups may be empty. A :class:`TokenGroups` validates the counts (or end offsets)
once and caches the device offsets every GEMM of a layer reuses.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..errors import GraphCaptureError, bad_arg, bad_type
from ..checks import check_int

__all__ = ["TokenGroups", "upload_ints"]


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
        if values.is_cuda and torch.cuda.is_current_stream_capturing():
            # The copy would be refused (pageable) or recorded as a node that runs only at replay.
            raise GraphCaptureError(
                f"TokenGroups: reading {name} of a CUDA tensor on the host (a device-to-host copy) while a CUDA "
                "graph captures; this runs where the grouped GEMM needs host row counts: per-expert GEMMs (float32 "
                "weights on CUDA, bf16 below sm90) or separate weight pieces. Under capture use bf16 weights on "
                "sm90/sm100 in one tensor or a composite view, or give host counts made before the capture")
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
    return np.array([check_int(name, v) for v in values], dtype=np.int64)  # int subclasses, NumPy ints

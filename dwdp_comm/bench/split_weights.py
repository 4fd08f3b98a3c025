"""Split weights and their composite view, built by the library's own heap backend, for kernel benchmarks.

A DWDP rank reads an expert tensor either as pieces in separate allocations (its shard and the
prefetch slots) or as one composite view mapping those pieces back to back (CUDA VMM on
``cuda_ipc``; memfd pages on ``sim``). :class:`SplitWeights` reproduces both from a contiguous
tensor with the same backend calls the prefetcher uses (``alloc_buffer``, ``compose``), so a
benchmark or a test measures the real views, not a second implementation of them.
:func:`single_rank_group` gives a single process the one-rank group those calls need.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator, Sequence

import torch

from ..errors import DwdpError, bad_arg, bad_type

__all__ = ["SplitWeights", "single_rank_group"]


class SplitWeights:
    """``w`` copied piece by piece into buffers of ``group``'s backend, and those buffers composed.

    Parameters
    ----------
    group : dwdp_comm.group.Group
        Its backend allocates the buffers (one allocation per piece) and composes the view.
    w : torch.Tensor
        ``[E, ...]`` contiguous, on ``group.device``. Copied once (on the current stream, then a
        device sync); not referenced afterwards.
    cuts : sequence of int
        Piece boundaries ``0 = cuts[0] < cuts[1] < ... < cuts[-1] = E``: piece ``i`` holds
        experts ``cuts[i] .. cuts[i+1] - 1``.

    Attributes
    ----------
    segments : list of (int, torch.Tensor)
        ``(first_expert, [count, ...])`` per piece, each in its own allocation (the form
        :meth:`dwdp_comm.PrefetchHandle.weight_segments` returns).
    composite : torch.Tensor or None
        ``[E, ...]``: the pieces' memory mapped back to back in one range (no copy), or None
        where the backend composes no views or a piece is not a multiple of its
        ``map_granularity``.
    why_not : str or None
        Why ``composite`` is None.

    Notes
    -----
    Not collective; blocking (one device sync after the copies). :meth:`close` releases the
    buffers and the view; tensors still referenced stay valid memory but must not be used.
    """

    def __init__(self, group, w: torch.Tensor, cuts: Sequence[int]):
        if not isinstance(w, torch.Tensor) or w.dim() < 2 or not w.is_contiguous():
            raise bad_type("w", w, "a contiguous [E, ...] torch.Tensor")
        if w.device != group.device:
            raise bad_arg("w", f"a tensor on {w.device}", f"the group's device {group.device}")
        cuts = [int(c) for c in cuts]
        E = int(w.shape[0])
        if len(cuts) < 2 or cuts[0] != 0 or cuts[-1] != E or any(b <= a for a, b in zip(cuts[:-1], cuts[1:])):
            raise bad_arg("cuts", cuts, f"increasing piece boundaries from 0 to {E}")
        impl = group.impl
        self._device, self._bufs, self._comp = w.device, [], None
        self.segments, self.composite, self.why_not = [], None, None
        expert_nbytes = w[0].numel() * w.element_size()
        try:
            for a, b in zip(cuts[:-1], cuts[1:]):
                buf = impl.alloc_buffer((b - a) * expert_nbytes)
                self._bufs.append(buf)
                piece = buf.tensor(0, (b - a) * expert_nbytes).view(w.dtype).view(b - a, *w.shape[1:])
                piece.copy_(w[a:b])
                self.segments.append((a, piece))
            gran = impl.map_granularity
            if gran is None:
                self.why_not = f"backend {impl.name!r} composes no views here" + (
                    f" ({impl.mode_reason})" if getattr(impl, "mode_reason", None) else "")
            elif any(buf.nbytes % gran for buf in self._bufs):
                self.why_not = (f"piece sizes {[buf.nbytes for buf in self._bufs]} are not multiples of the "
                                f"map granularity {gran}")
            else:
                self._comp = impl.compose([(buf, 0, buf.nbytes) for buf in self._bufs])
                self.composite = self._comp.tensor().view(w.dtype).view(tuple(w.shape))
            if w.device.type == "cuda":
                torch.cuda.synchronize(w.device)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the composite and the buffers (idempotent; syncs the device first on CUDA)."""
        if self._bufs and self._device.type == "cuda":
            torch.cuda.synchronize(self._device)  # no kernel still reads the memory released below
        self.segments, self.composite = [], None
        if self._comp is not None:
            self._comp.close()
            self._comp = None
        for buf in self._bufs:
            buf.close()
        self._bufs = []


@contextlib.contextmanager
def single_rank_group(backend: str = "auto", **options) -> Iterator:
    """A one-rank DWDP group in this process, for single-process benchmarks and tests.

    Initialises torch.distributed (gloo, a file rendezvous in a temporary directory, world size
    1), then :func:`dwdp_comm.init` with ``backend`` and ``options``; on exit closes the group
    and destroys the process group. Blocking.

    Raises
    ------
    DwdpError
        torch.distributed is already initialised in this process (use :func:`dwdp_comm.init`).
    BackendUnavailableError
        ``backend`` cannot run here.
    """
    import torch.distributed as dist

    from ..group import init
    if dist.is_available() and dist.is_initialized():
        raise DwdpError("single_rank_group: torch.distributed is already initialized in this process; "
                        "call dwdp_comm.init() on that group instead")
    with tempfile.TemporaryDirectory(prefix="dwdp_single_rank_") as d:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(d, 'rendezvous')}", rank=0,
                                world_size=1)
        try:
            group = init(backend, **options)
            try:
                yield group
            finally:
                group.close()
        finally:
            dist.destroy_process_group()

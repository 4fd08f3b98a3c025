"""Worker streams: a pool of CUDA streams per caller stream, forked from it and joined back."""

from __future__ import annotations

import collections
import contextlib

import torch

__all__ = ["WorkerStreams"]


class WorkerStreams:
    """Worker streams for the pieces of a split GEMM (a pool per caller stream, reused), or none.

    Work is cut into units (a piece, a run of experts, one expert: ``segments_async`` /
    ``segments_direct``) and the units into contiguous chunks, chunk ``j`` on worker ``j``: each
    unit's grouped GEMM then the copy of its result into the output (a D2D ``cudaMemcpyAsync``:
    the copy engine), or its ``torch.mm`` into the output rows;
    :func:`dwdp_comm.kernels.torch_path.run_rows` puts piece ``j`` on worker ``j mod n``, its
    GEMM then ``consume``. Pieces on different workers run at the same time, so one kernel's tail
    fills with the next one's tiles, and each copy overlaps other pieces' GEMMs instead of piling
    up behind the last.

    Ordering: :meth:`fork` makes every worker wait for what the current stream has enqueued so
    far (x, scales, offsets, the caller's ``out``, and the earlier users of any block the current
    stream hands out after the fork); :meth:`join` makes the current stream wait for every
    worker, so the result is ready on the current stream as if all had run there. Memory: a
    piece's temporary is allocated on its worker stream and freed after its copy was enqueued
    there, so its block is reused only after that copy (no ``record_stream``); the block stays
    cached in that worker's pool. The output, allocated on the current stream after the fork, is
    written by the workers on rows the current stream's GEMM does not touch; its block's earlier
    users were enqueued before the fork.

    Pools: one per (device, caller stream), its workers created at the caller stream's priority,
    so split GEMMs issued from two streams do not queue behind each other's pieces and a
    high-priority caller keeps its priority. At most :attr:`POOLS` pools are kept (least
    recently used dropped; torch hands its streams out of a fixed per-device pool, so dropping
    one frees nothing and in-flight work is unaffected).

    Parameters
    ----------
    device : torch.device
        Device of the work; off CUDA there are no workers and everything runs in order.
    pieces : int
        Units of work to spread: at most ``min(pieces, MAX)`` workers are used.
    overlap : bool
        False: no workers (everything on the current stream).

    Attributes
    ----------
    streams : list of torch.cuda.Stream
        The workers in use (empty: everything on the current stream).
    """

    MAX = 4  # concurrent pieces: enough to fill the tails; more only adds streams
    POOLS = 8
    _pools: "collections.OrderedDict" = collections.OrderedDict()

    def __init__(self, device: torch.device, pieces: int, overlap: bool):
        self.main, self.streams = None, []
        if overlap and device.type == "cuda" and pieces > 0:
            self.main = torch.cuda.current_stream(device)
            key = (self.main.device_index, self.main.stream_id)
            pool = self._pools.pop(key, [])
            self._pools[key] = pool  # most recently used last
            while len(self._pools) > self.POOLS:
                self._pools.popitem(last=False)
            while len(pool) < min(pieces, self.MAX):
                pool.append(torch.cuda.Stream(device=self.main.device_index, priority=self.main.priority))
            self.streams = pool[:min(pieces, self.MAX)]

    @classmethod
    def pool_of(cls, stream: "torch.cuda.Stream") -> list:
        """The worker streams kept for caller ``stream`` (a copy of the list; empty when none)."""
        return list(cls._pools.get((stream.device_index, stream.stream_id), ()))

    def fork(self) -> None:
        """Make every worker wait for the work enqueued so far on the current stream (no host wait)."""
        for st in self.streams:
            st.wait_stream(self.main)

    def on(self, j: int):
        """Context: work enqueued inside runs on piece ``j``'s worker (or the current stream)."""
        return torch.cuda.stream(self.streams[j % len(self.streams)]) if self.streams else contextlib.nullcontext()

    def join(self) -> None:
        """Make the current stream wait for every worker (no host wait)."""
        for st in self.streams:
            self.main.wait_stream(st)

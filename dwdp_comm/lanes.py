"""Which copy stream (lane) runs each copy of a plan: one rule for the GPU executor, the flags of its
time division and the contention model.

Pure NumPy (no CUDA, no torch), so the model and the CPU tests place copies exactly where the GPU
executor (:class:`dwdp_comm.backends.cuda.executor.CopyExecutor`) does.

A copy engine has ``streams`` lanes for copies from peers and one more, the **local lane**, for
copies from this rank itself (``src_rank == rank``: local experts copied into a slot in gather mode,
which the ``nvshmem`` backend always uses): they never cross the fabric and must overlap the peers'
copies instead of queueing behind them. Peers' copies are spread by ``distribute``:

* ``"source"``: ``lane = ((src_rank - rank - 1) mod G) mod streams``, so each peer has a lane of
  its own when ``streams >= G - 1``, the nearest peer (``rank + 1``) on lane 0;
* ``"slot"``: ``lane = slot mod streams``.

Within a lane copies run in plan order.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import bad_arg

__all__ = ["DISTRIBUTIONS", "local_lane", "copy_lanes", "lanes_of_source", "issue_order", "hardware_queue"]

DISTRIBUTIONS = ("source", "slot")


def local_lane(streams: int) -> int:
    """Index of the local lane (copies with ``src_rank == rank``): the one after the ``streams`` peer lanes."""
    return int(streams)


def copy_lanes(src_rank, slot, *, rank: int, group_size: int, streams: int, distribute: str) -> np.ndarray:
    """The lane of every copy of one rank's plan.

    Parameters
    ----------
    src_rank, slot : array_like of int
        ``[num_copies]``: each copy's source rank and time-division slot (a :class:`CopyPlan`'s
        ``src_rank`` and ``slot``).
    rank, group_size : int
        The rank running the copies and its group's size.
    streams : int
        Lanes for peers' copies (``>= 1``); local copies go to :func:`local_lane`.
    distribute : {"source", "slot"}

    Returns
    -------
    numpy.ndarray
        ``int64 [num_copies]``, values in ``[0, streams]``.
    """
    if distribute not in DISTRIBUTIONS:
        raise bad_arg("distribute", distribute, f"one of {list(DISTRIBUTIONS)}")
    if streams < 1:
        raise bad_arg("streams", streams, "an int >= 1")
    src = np.asarray(src_rank, dtype=np.int64)
    if distribute == "source":
        lanes = ((src - rank - 1) % group_size) % streams
    else:
        lanes = np.asarray(slot, dtype=np.int64) % streams
    return np.where(src == rank, local_lane(streams), lanes).astype(np.int64)


def lanes_of_source(src: int, reader: int, *, group_size: int, streams: int, distribute: str) -> Sequence[int]:
    """The lanes of rank ``reader`` that may carry copies read from peer ``src`` (``src != reader``):
    one with ``distribute="source"``, any of the ``streams`` with ``"slot"``."""
    if distribute == "source":
        return (int(((src - reader - 1) % group_size) % streams),)
    return range(int(streams))


def issue_order(lanes, slot, *, streams: int, sync: bool) -> np.ndarray:
    """The order in which the executor enqueues one job's copies (indices into plan order).

    The local lane comes first (nothing it does waits). Without time division each lane is then
    issued whole, lane by lane (one batch call per lane); with it (``sync``) the peer lanes are
    issued slot by slot (slot-major, then lane), so that a flag wait never sits in a shared hardware
    queue ahead of a write it depends on. Within a lane: plan order. Where lanes share a hardware
    queue (:func:`hardware_queue`), this is the order the queue runs them in.
    """
    lanes = np.asarray(lanes, dtype=np.int64)
    idx = np.arange(lanes.shape[0])
    remote = lanes != local_lane(streams)
    if sync:
        return np.lexsort((idx, lanes, np.asarray(slot, dtype=np.int64), remote))
    return np.lexsort((idx, lanes, remote))


def hardware_queue(lane, *, streams: int, max_queues: int):
    """The hardware queue a lane's copies run on when a process gets ``max_queues`` of them
    (``CUDA_DEVICE_MAX_CONNECTIONS``): the executor creates its ``streams + 1`` lanes in order
    (the local lane last), and streams beyond the queues share them round robin, so lane ``l`` runs
    on queue ``l mod min(streams + 1, max_queues)``. Works on ints and arrays."""
    return lane % min(int(streams) + 1, int(max_queues))

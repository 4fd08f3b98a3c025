"""Helpers for tests and debugging.

* :func:`local_digest` / :func:`check_local_unchanged`: a debug check that no rank wrote into its
  heap through a view (views are read-only by contract, not enforced on GPU backends).
* :func:`launch` and :func:`gpu_count` live in :mod:`dwdp_comm.launch` (library code: the CLI uses
  them); they are re-exported here for compatibility.
"""

from __future__ import annotations

import torch

from .comm import describe
from .errors import bad_arg
from .launch import gpu_count, launch

__all__ = ["local_digest", "check_local_unchanged"]  # launch, gpu_count: documented in dwdp_comm.launch


def local_digest(store) -> dict:
    """A checksum of this rank's shard of every tensor of a committed store, as the heap holds it.

    Local. Copies every local shard to the host once (a debug check: not for a hot path).

    Parameters
    ----------
    store : WeightStore
        Committed, open.

    Returns
    -------
    dict[(int, str), int]
        ``(layer, name) -> CRC-32`` of the bytes of ``store.local(layer, name)``; give it to
        :func:`check_local_unchanged`.
    """
    return {(layer, name): _crc(store.local(layer, name)) for layer in store.layers for name in store.names(layer)}


def check_local_unchanged(store, digest: dict) -> None:
    """Collective: raise on every rank if the heap of any rank changed since :func:`local_digest`.

    Prefetched views and ``local()`` are read-only by contract, but on GPU backends the rows of
    composite-mode names in ``weights()`` and ``local()`` *are* the heap pages that peers read, so
    a write through them would silently change that expert for every rank (``sim`` maps them
    copy-on-write instead). Run this in a debug mode, between steps, to catch such writes.

    Parameters
    ----------
    store : WeightStore
        The store ``digest`` was taken of; every rank of its group calls this.
    digest : dict
        This rank's :func:`local_digest` of ``store``.

    Raises
    ------
    CollectiveFailedError
        Some rank's heap changed: every rank raises the same error, naming each such rank and its
        changed ``(layer, name)``.
    InvalidArgumentError
        ``digest`` is not a digest of this store (raised on every rank).
    CollectiveTimeoutError, TransportError
        A rank did not arrive in time, or died.
    """
    err, cause = None, None
    try:
        now = local_digest(store)
        if not isinstance(digest, dict) or set(digest) != set(now):
            got = sorted(digest)[:4] if isinstance(digest, dict) else type(digest).__name__
            raise bad_arg("digest", got, "the dict local_digest(store) returned for this store")
        changed = [k for k in sorted(now) if now[k] != digest[k]]
        if changed:
            err = "local shard changed since local_digest(): " + ", ".join(f"layer {l}, {n!r}" for l, n in changed)
    except Exception as exc:
        err, cause = describe(exc), exc
    store.group.comm.agree(err, "testing.check_local_unchanged", cause=cause,
                           hint="views from weights(), weight_segments() and local() are read-only: "
                                "copy a tensor before changing it")


def _crc(t) -> int:
    import zlib
    raw = t.detach().reshape(-1).view(torch.uint8) if t.numel() else t.new_empty(0, dtype=torch.uint8)
    return zlib.crc32(raw.cpu().numpy().tobytes())

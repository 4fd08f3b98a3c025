"""What the copy-plane model knows of a fabric: per-GPU port caps and per-copy costs.

:class:`Fabric` is the description :func:`dwdp_comm.bench.model.simulate` runs on; the presets
(:func:`h200`, :func:`nvl72`) are the calibrated or assumed numbers of real GPU groups.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from ..errors import bad_arg

__all__ = ["Fabric", "h200", "nvl72"]


@dataclass(frozen=True)
class Fabric:
    """Caps and overheads of one group of GPUs (bytes/s and seconds).

    Attributes
    ----------
    group_size : int
    egress_Bps, ingress_Bps : float
        Per-GPU caps of what a copy engine moves out of / into one GPU over the fabric.
    duplex_Bps : float or None
        Cap on egress + ingress of one GPU (None: no such cap).
    local_Bps : float
        Device-local copy rate (copies with ``src == dst``).
    copy_overhead_s : float
        Fixed cost of one ``cudaMemcpyAsync`` on a stream (no bytes move meanwhile), GPU side.
    batch_call_overhead_s, batch_copy_overhead_s : float
        ``cudaMemcpyBatchAsync``: per call, and per copy inside a call.
    graph_copy_overhead_s : float
        Per memcpy node of a captured graph.
    flag_latency_s : float
        From the last copy of a slot to the release of a stream waiting on its flag.
    harness_copy_overhead_s : float or None
        Per copy in the ``issue_fifo`` executor (one host thread issuing every copy: the host's
        cost per call included). None: ``copy_overhead_s``.
    max_streams : int
        Hardware queues a GPU gives one process (``CUDA_DEVICE_MAX_CONNECTIONS``, default 8):
        lanes beyond it share a queue (lane ``l`` runs on queue ``l mod max_streams``, in plan order).
    name, notes : str
    """

    group_size: int
    egress_Bps: float
    ingress_Bps: float
    duplex_Bps: float | None
    local_Bps: float
    copy_overhead_s: float
    batch_call_overhead_s: float
    batch_copy_overhead_s: float
    graph_copy_overhead_s: float
    flag_latency_s: float
    harness_copy_overhead_s: float | None = None
    max_streams: int = 8
    name: str = ""
    notes: str = ""

    def __post_init__(self):
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, (int, np.integer)) \
                or self.group_size < 1:
            raise bad_arg("group_size", self.group_size, "an int >= 1")
        for k in ("egress_Bps", "ingress_Bps", "local_Bps"):
            if not getattr(self, k) > 0:
                raise bad_arg(k, getattr(self, k), "a rate in bytes/s > 0")
        if isinstance(self.max_streams, bool) or not isinstance(self.max_streams, (int, np.integer)) \
                or self.max_streams < 1:
            raise bad_arg("max_streams", self.max_streams, "an int >= 1")
        if self.duplex_Bps is not None and not self.duplex_Bps > 0:
            raise bad_arg("duplex_Bps", self.duplex_Bps, "None or a rate in bytes/s > 0")
        for k in ("copy_overhead_s", "batch_call_overhead_s", "batch_copy_overhead_s",
                  "graph_copy_overhead_s", "flag_latency_s"):
            if not getattr(self, k) >= 0:
                raise bad_arg(k, getattr(self, k), "a time in seconds >= 0")
        if self.harness_copy_overhead_s is not None and not self.harness_copy_overhead_s >= 0:
            raise bad_arg("harness_copy_overhead_s", self.harness_copy_overhead_s, "None or a time in seconds >= 0")

    def with_(self, **changes: Any) -> "Fabric":
        """A copy with some fields changed."""
        return replace(self, **changes)

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def pair_Bps(self) -> float:
        """The bandwidth of one large copy between two GPUs (overhead excluded)."""
        return min(self.egress_Bps, self.ingress_Bps)


# Caps fitted to DEVICE_NOTES.md (4 x H200, NVLink4 x 18 through NVSwitch, 2026-11-22): pair 394
# GB/s; ring 1545 = 4 x 386 GB/s gives the duplex cap 2 x 386; local copy 2.06 TB/s. That table's
# 1 GiB as 1 / 16 / 256 copies (393 / 371 / 221 GB/s), issued by one host thread, gives ~8.5 us per
# copy: the harness's cost. Per-copy costs on the GPU, measured on 2 x H200 (2026-11-29, host
# issuing ahead): 3.9 us per cuMemcpyAsync and per graph node (8 MiB chunks: 84.5 % of one 1 GiB
# copy), nothing measurable per batched copy; the batch call's own cost (one launch) is assumed;
# flags 5 us (tdm, pair, 8 MiB slots: 69.9 %).
_H200 = dict(egress_Bps=394e9, ingress_Bps=394e9, duplex_Bps=772e9, local_Bps=2.06e12,
             copy_overhead_s=3.9e-6, batch_call_overhead_s=3.9e-6, batch_copy_overhead_s=0.0,
             graph_copy_overhead_s=3.9e-6, flag_latency_s=5.0e-6, harness_copy_overhead_s=8.5e-6)


def h200(group_size: int = 4) -> Fabric:
    """H200 SXM GPUs on NVSwitch (NVLink4, 18 links): the calibrated caps, ``group_size`` GPUs.

    Group sizes above 4 (an 8-GPU HGX board) assume the same per-GPU caps: every GPU has its own
    18 links into the switches, and the switches are non blocking.
    """
    return Fabric(group_size=group_size, name=f"h200x{group_size}",
                  notes="caps calibrated on 4 x H200 (DEVICE_NOTES.md); per-copy costs measured on 2 x H200",
                  **_H200)


def nvl72(group_size: int = 72) -> Fabric:
    """An NVL72-like domain: 1.8 TB/s per GPU bidirectional (NVLink5), ``group_size`` GPUs.

    Assumptions: 900 GB/s per direction nominal; a copy engine reaches the same fraction of nominal
    as on H200 (394 of 478 GB/s: 82.4 %), so 742 GB/s per direction; the same duplex loss as on
    H200 (386 / 394); per-copy overheads as on H200 (a CUDA driver property, not a link property);
    local HBM3e copies at 2 x 2.06 TB/s (8 TB/s HBM against 4.8).
    """
    frac = 394.0 / 478.0
    e = 900e9 * frac
    return Fabric(group_size=group_size, egress_Bps=e, ingress_Bps=e, duplex_Bps=2 * e * 386.0 / 394.0,
                  local_Bps=4.12e12, **{k: v for k, v in _H200.items() if k.endswith("_s")},
                  name=f"nvl72x{group_size}",
                  notes="1.8 TB/s per GPU bidirectional nominal, H200 efficiency and overheads assumed")



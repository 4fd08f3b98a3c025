"""dwdp_comm: Distributed Weight Data Parallelism for MoE inference.

Every rank runs the whole model on its own requests; each MoE layer's routed experts are sharded
across the group in a symmetric heap, and a copy engine pulls the experts a rank does not own from
its peers while it computes the previous layer. See ``docs/design.md``.

>>> import dwdp_comm as dc
>>> group = dc.init(backend="auto")                      # collective
>>> layout = dc.ExpertLayout(num_experts=256, group_size=group.size, rank=group.rank)
>>> store = dc.WeightStore(group, layout)
>>> store.register(layer=0, name="w13", shard=w13_local)  # [layout.num_local_experts, ...]
>>> store.commit()                                      # collective
>>> pf = dc.Prefetcher(store, depth=2, schedule="round_robin", chunk_nbytes=8 << 20)
>>> h = pf.prefetch(layer=0); h.wait(); w13 = h.weights("w13"); h.release()

Importing needs only torch and numpy; GPU backends import their packages when chosen.
"""

from .errors import (BackendUnavailableError, ClosedError, CollectiveError, CollectiveFailedError,
                     CollectiveMismatchError, CollectiveTimeoutError, DwdpError, InvalidArgumentError, InvalidTypeError,
                     MissingDependencyError, PeerAccessError, RankFailedError, SlotStillHeldError, GraphCaptureError,
                     TransportError)
from .group import Group, init
from .layout import ExpertLayout
from .planner import CopyPlan, CopyRange, make_plan, policies, register_policy
from .prefetch import PrefetchHandle, Prefetcher
from .placement import Placement, TensorSpec
from .store import WeightStore
from .version import __version__
from . import testing

__all__ = [
    "init", "Group", "ExpertLayout", "WeightStore", "TensorSpec", "Placement", "Prefetcher", "PrefetchHandle",
    "CopyPlan", "CopyRange", "make_plan", "policies", "register_policy", "testing",
    "DwdpError", "InvalidArgumentError", "InvalidTypeError", "ClosedError", "CollectiveMismatchError",
    "BackendUnavailableError", "MissingDependencyError", "PeerAccessError", "SlotStillHeldError", "RankFailedError",
    "GraphCaptureError", "CollectiveError", "CollectiveFailedError", "CollectiveTimeoutError", "TransportError",
]

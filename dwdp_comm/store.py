"""WeightStore: named per-layer expert shards placed in the symmetric heap.

Placement (computed identically on every rank from the registrations gathered at ``commit()``):

* Heap: layers in ascending order, each a region starting at an aligned offset; inside it one
  entry per name (ascending), each aligned and sized for ``layout.max_local_experts`` experts, so
  the layout is the same on every rank (symmetric) even with uneven shards. Layers with the same
  tensors therefore have the same relative offsets and share one copy plan.
* Prefetch slot (per rank): for each name, where that name's experts land. Two modes:

  ``composite`` (the backend can map views and every rank's block of experts starts and ends on a
  mapping page: e.g. every expert's bytes a multiple of the granularity, or Qwen3-30B-A3B's 64
  experts of 3 MiB a rank on 2 MiB pages): the slot holds only the remote experts, packed in
  global order with this rank's block left out; ``weights()`` is one ``[num_experts, ...]``
  range that maps the slot pages and the local heap pages back to back, zero copy.

  ``gather`` (otherwise): the slot holds all ``num_experts`` experts and the plan also copies the
  local ones in (a local copy, never on the fabric).

:meth:`WeightStore.placement` answers where one (layer, name) lives with a
:class:`~dwdp_comm.placement.Placement` (offsets, mode, slot rows); :meth:`WeightStore.slot_view`
with the :class:`~dwdp_comm.placement.SlotView` a prefetch slot gives.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from .checks import align_up, check_int
from .comm import describe
from .errors import ClosedError, CollectiveError, CollectiveMismatchError, DwdpError, TransportError, bad_arg, bad_type
from .group import Group
from .layout import ExpertLayout
from .placement import COMPOSITE, GATHER, Placement, SlotView, TensorSpec, as_experts
from .planner import CopyRange

__all__ = ["WeightStore"]

log = logging.getLogger("dwdp_comm")


def _as_tensor(shard: Any) -> torch.Tensor:
    if isinstance(shard, torch.Tensor):
        return shard
    if isinstance(shard, np.ndarray):
        return torch.from_numpy(shard)
    if hasattr(shard, "__dlpack__"):
        return torch.from_dlpack(shard)
    raise bad_type("shard", shard, "a torch.Tensor, a numpy.ndarray or an object with __dlpack__")


class WeightStore:
    """Per-layer expert tensors of one DWDP group, placed in the symmetric heap.

    Parameters
    ----------
    group : Group
        From :func:`dwdp_comm.init`.
    layout : ExpertLayout
        Which rank owns which expert; its ``group_size`` and ``rank`` must match the group's.

    Notes
    -----
    ``register`` is local; ``commit`` and ``close`` are collective over the group, and each is one
    agreed step: when it fails on one rank, every rank raises the same error naming that rank (see
    ``docs/design.md``, "Failure model"). ``close()`` is idempotent; leaving a ``with`` block by an
    exception calls :meth:`abort` (local) instead.
    """

    def __init__(self, group: Group, layout: ExpertLayout):
        if not isinstance(group, Group):
            raise bad_type("group", group, "a dwdp_comm.Group (from dwdp_comm.init)")
        group.check_open()
        if not isinstance(layout, ExpertLayout):
            raise bad_type("layout", layout, "a dwdp_comm.ExpertLayout")
        if (layout.group_size, layout.rank) != (group.size, group.rank):
            raise bad_arg("layout", f"group_size={layout.group_size}, rank={layout.rank}",
                          f"group_size={group.size}, rank={group.rank} (the group's)")
        self.group, self.layout = group, layout
        self._backend = group.impl
        self._shards: dict[int, dict[str, torch.Tensor]] = {}
        self._entries: dict[int, dict[str, Placement]] = {}
        self._layer_base: dict[int, int] = {}
        self._slot_nbytes: dict[int, int] = {}
        self._signature: dict[int, tuple] = {}
        self.heap = None
        self._prefetchers: list = []
        self._committed = False
        self._closed = False
        self._failed: str | None = None  # why commit() failed, for later use errors
        group._stores.append(self)

    # ---- registration ------------------------------------------------------------------------
    def register(self, layer: int, name: str, shard: Any) -> None:
        """Register this rank's shard of one named expert tensor of ``layer``. Local.

        Parameters
        ----------
        layer : int
            MoE layer index (>= 0). Layers need not be consecutive.
        name : str
            Tensor name, e.g. ``"w13"``, ``"w2"``, ``"w13_scale"``.
        shard : torch.Tensor, numpy.ndarray or DLPack object
            ``[layout.num_local_experts, *expert_shape]``, any dtype (float8 included; it is stored
            as bytes), on any device. Copied into the heap at :meth:`commit`; it may be freed
            after that. Its first dimension is checked against the layout at :meth:`commit`.

        Raises
        ------
        DwdpError
            Called after :meth:`commit`.
        InvalidArgumentError
            ``layer < 0``, an empty ``name``, a name already registered for ``layer``, or a
            0-d ``shard``.
        InvalidTypeError
            ``layer`` is not an int, or ``shard`` is not a tensor-like object.
        ClosedError
            The store or its group was closed.
        """
        self._check_open()
        if self._committed:
            raise DwdpError(f"register(layer={layer!r}, name={name!r}) after commit(): register every tensor "
                            "before the collective commit()")
        layer = check_int("layer", layer, low=0)
        if not isinstance(name, str) or not name:
            raise bad_arg("name", name, "a non-empty str")
        t = _as_tensor(shard)
        if t.dim() < 1:
            raise bad_arg("shard", f"a tensor of shape {tuple(t.shape)}",
                          "a tensor with a leading expert dimension [num_local_experts, ...]")
        if name in self._shards.get(layer, {}):
            raise bad_arg("name", name, f"a name not yet registered for layer {layer}")
        self._shards.setdefault(layer, {})[name] = t

    # ---- commit --------------------------------------------------------------------------------
    def commit(self) -> None:
        """Collective: check registrations agree, place shards in the heap, exchange handles.

        Every rank checks every rank's registrations (same layers, names, dtypes and per-expert
        shapes; shards sized as the layout says) and raises the same
        :class:`~dwdp_comm.errors.CollectiveMismatchError` naming the layer, name and rank. Blocks
        the host until every rank arrived (bounded by the process group's timeout); on return,
        peers may read this rank's shards.

        Raises
        ------
        CollectiveMismatchError
            Registrations differ between ranks (raised on every rank, same message).
        CollectiveFailedError
            Placing the shards failed on some rank (a shard that cannot be copied as bytes, such as
            a sparse, meta or conjugate-view tensor; a failed device copy; no memory): raised on
            every rank, naming the ranks and their errors. The store is then closed on every rank
            and its heap freed.
        CollectiveTimeoutError, TransportError
            A rank did not arrive in time or died (the store is then released locally).
        DwdpError
            Called twice.
        """
        self._check_open()
        if self._committed:
            raise DwdpError("commit() called twice")
        comm = self.group.comm
        mine = {"num_experts": self.layout.num_experts,
                "layers": {l: {n: (str(t.dtype).removeprefix("torch."), tuple(t.shape[1:]), int(t.shape[0]))
                               for n, t in names.items()} for l, names in self._shards.items()}}
        everyone = comm.all_gather_object(mine, "WeightStore.commit: checking registrations")
        problems = _check_registrations(everyone, self.layout)
        if problems:
            raise CollectiveMismatchError("WeightStore.commit(): registrations disagree:\n  " + "\n  ".join(problems),
                                          "WeightStore.commit: checking registrations")
        try:
            self._place()
            self.heap = self._backend.alloc_symmetric(self._heap_nbytes, self._heap_boundaries())  # agreed inside
            err, cause = None, None
            try:
                for layer, names in self._shards.items():
                    for name, t in names.items():
                        e = self._entries[layer][name]
                        nb = self.layout.num_local_experts * e.spec.expert_nbytes
                        if nb:
                            try:
                                src = _shard_bytes(t)
                                self.heap.local.tensor(e.heap_offset, nb).copy_(src)
                            except Exception as exc:
                                raise type(exc)(f"layer {layer}, name {name!r}: {exc}") from exc
                self._backend.synchronize()
            except Exception as exc:
                err, cause = describe(exc), exc
            # Peers may read our heap from now on, and only once every rank placed its shards:
            # one failed rank makes every rank raise (nobody returns with zeros in its heap).
            comm.agree(err, "WeightStore.commit: copying shards into the heap", cause=cause)
        except BaseException as exc:
            self._fail(exc)
            raise
        self._shards.clear()
        self._committed = True

    def _fail(self, exc: BaseException) -> None:
        """Release what a failed commit() allocated; collectively when every rank agreed on the
        failure (they all run this), locally when the transport failed."""
        self._failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        self._closed = True
        self._shards.clear()
        self._release_heap(collective=isinstance(exc, CollectiveError) and not isinstance(exc, TransportError))

    def _release_heap(self, collective: bool) -> None:
        heap, self.heap = self.heap, None
        if heap is None:
            return
        if collective and self.group.comm.broken is None:
            try:
                heap.close()  # collective: barrier first
                return
            except Exception as exc:
                log.warning("dwdp_comm: collective heap close failed (%r); releasing locally", exc)
        heap.abort()

    def _place(self) -> None:
        b, lay = self._backend, self.layout
        align, gran = b.alloc_alignment, b.map_granularity
        nl = lay.num_local_experts
        off = 0
        for layer in sorted(self._shards):
            off = align_up(off, align)
            self._layer_base[layer] = off
            entries, slot_off = {}, 0
            for name in sorted(self._shards[layer]):
                t = self._shards[layer][name]
                spec = TensorSpec(name, t.dtype, tuple(int(s) for s in t.shape[1:]))
                nb = spec.expert_nbytes
                mode = COMPOSITE if self._blocks_on_pages(nb, gran) else GATHER
                off = align_up(off, align)
                slot_off = align_up(slot_off, align)
                entries[name] = Placement(spec, mode, off, slot_off, lay.num_experts, lay.local_experts)
                off += lay.max_local_experts * nb
                slot_off += (lay.num_experts - (nl if mode == COMPOSITE else 0)) * nb
            self._entries[layer] = entries
            self._slot_nbytes[layer] = align_up(slot_off, align)
            base = self._layer_base[layer]
            self._signature[layer] = tuple((n, e.spec.expert_nbytes, e.heap_offset - base, e.slot_offset, e.mode)
                                           for n, e in entries.items())
        self._heap_nbytes = max(align_up(off, align), align)

    def _blocks_on_pages(self, expert_nbytes: int, gran: int | None) -> bool:
        """True when every rank's block of experts starts and ends on a mapping page: what a
        composite view needs (it maps whole pages of the slot and of the heap back to back). Every
        rank decides the same from the layout."""
        lay = self.layout
        return bool(gran and expert_nbytes) and all(
            (lay.first_expert(r) * expert_nbytes) % gran == 0 and (lay.num_experts_of(r) * expert_nbytes) % gran == 0
            for r in range(lay.group_size))

    def _heap_boundaries(self) -> list[int]:
        """Where composite views cut the heap: around each composite entry's local block."""
        nl = self.layout.num_local_experts
        return sorted({b for ents in self._entries.values() for e in ents.values() if e.mode == COMPOSITE
                       for b in (e.heap_offset, e.heap_offset + nl * e.spec.expert_nbytes)})

    def slot_boundaries(self) -> list[int]:
        """Where composite views cut a prefetch slot (the pieces before and after the local block
        of each composite entry, over every layer)."""
        self.check_committed()
        lay = self.layout
        first, nl = lay.first_expert(lay.rank), lay.num_local_experts
        return sorted({b for ents in self._entries.values() for e in ents.values() if e.mode == COMPOSITE
                       for b in (e.slot_offset, e.slot_offset + first * e.spec.expert_nbytes,
                                 e.slot_offset + (lay.num_experts - nl) * e.spec.expert_nbytes)})

    # ---- queries -------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    @property
    def layers(self) -> tuple[int, ...]:
        """Committed layers, ascending."""
        self.check_committed()
        return tuple(sorted(self._entries))

    def names(self, layer: int) -> tuple[str, ...]:
        """Names registered for ``layer``, ascending."""
        return tuple(self._layer(layer))

    def spec(self, layer: int, name: str) -> TensorSpec:
        """dtype and per-expert shape of ``name`` in ``layer``."""
        return self._entry(layer, name).spec

    def slot_mode(self, layer: int, name: str) -> str:
        """``"composite"`` or ``"gather"`` (see the module docstring)."""
        return self._entry(layer, name).mode

    @property
    def slot_nbytes(self) -> int:
        """Bytes one prefetch slot needs (the largest layer)."""
        self.check_committed()
        return max(self._slot_nbytes.values())

    @property
    def heap_nbytes(self) -> int:
        """Bytes of this rank's part of the symmetric heap."""
        self.check_committed()
        return self._heap_nbytes

    def remote_nbytes(self, layer: int) -> int:
        """Bytes of ``layer`` that this rank does not own (what a full prefetch pulls)."""
        ents = self._layer(layer)
        n_remote = self.layout.num_experts - self.layout.num_local_experts
        return sum(n_remote * e.spec.expert_nbytes for e in ents.values())

    def local(self, layer: int, name: str) -> torch.Tensor:
        """This rank's shard in the heap: ``[num_local_experts, *expert_shape]``, zero copy.

        Returns
        -------
        torch.Tensor
            Of the registered dtype, on the group's device (host shared memory on ``sim``). Read-only
            by contract: peers read these bytes. On ``sim`` it is a copy-on-write view (a write stays
            in the tensor); on GPU backends it is the heap memory itself. It stays valid (no crash)
            while referenced, even past :meth:`close`, but is only meaningful until then.
        """
        e = self._entry(layer, name)
        nb = self.layout.num_local_experts * e.spec.expert_nbytes
        return as_experts(self.heap.local.private_tensor(e.heap_offset, nb), e.spec, self.layout.num_local_experts)

    # ---- what the prefetcher needs ---------------------------------------------------------------
    def copy_ranges(self, layer: int, experts: tuple[int, ...]) -> list[CopyRange]:
        """Byte ranges (relative to the layer's heap region and to the slot) for ``experts``.

        ``experts`` are remote experts, ascending. Gather-mode names also get this rank's own
        experts (``src_rank == rank``).
        """
        lay, base = self.layout, self._layer_base[layer]
        runs = _runs(experts, lay)
        out = []
        for e in self._layer(layer).values():
            nb = e.spec.expert_nbytes
            todo = runs
            if e.mode == GATHER:
                todo = sorted(runs + [(lay.rank, lay.first_expert(lay.rank), lay.num_local_experts)],
                              key=lambda r: r[1])
            for owner, start, count in todo:
                src = e.heap_offset - base + (start - lay.first_expert(owner)) * nb
                out.append(CopyRange(owner, src, e.slot_offset + e.slot_row(start) * nb, count * nb))
        return out

    def layer_signature(self, layer: int) -> tuple:
        """Hashable description of ``layer``'s placement relative to its base (plan cache key)."""
        self._layer(layer)
        return self._signature[layer]

    def layer_base(self, layer: int) -> int:
        """Heap offset where ``layer``'s region starts (plans are relative to it)."""
        self._layer(layer)
        return self._layer_base[layer]

    def slot_view(self, layer: int, name: str) -> SlotView:
        """Which view a prefetch slot gives for ``name`` of ``layer``: the pieces of the slot and of
        this rank's heap part that make its ``[num_experts, ...]`` tensor (see :class:`SlotView`).
        Not collective; raises for an unregistered layer or name."""
        return self._entry(layer, name).view()

    def placement(self, layer: int, name: str) -> Placement:
        """Where ``name`` of ``layer`` lives on this rank: heap and slot offsets, slot mode, spec
        (see :class:`~dwdp_comm.placement.Placement`). Not collective; raises for an unregistered
        layer or name."""
        return self._entry(layer, name)

    def attach(self, prefetcher: Any) -> None:
        """Register ``prefetcher`` (made over this store): :meth:`close` and :meth:`abort` close it first."""
        self._prefetchers.append(prefetcher)

    # ---- close ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Collective: close this store's prefetchers, wait until no rank reads the heap, free it.

        One agreed step: blocks the host until every rank called it (bounded by the group's
        timeout); an error on one rank (a failed copy found while closing a prefetcher, ...) is
        raised on every rank, after the heap was freed. A second call does nothing.
        """
        if self._closed:
            return
        self._closed = True
        err, cause = None, None
        for pf in self._prefetchers:
            try:
                pf.close()
            except Exception as exc:
                if err is None:
                    err, cause = describe(exc), exc
        try:
            if self.heap is not None:
                try:
                    self._backend.synchronize()
                except Exception as exc:
                    if err is None:
                        err, cause = describe(exc), exc
                self.group.comm.agree(err, "WeightStore.close", cause=cause)  # nobody reads the heap now
                self._release_heap(collective=True)
            elif cause is not None:
                raise cause
        except BaseException as exc:
            self._release_heap(collective=isinstance(exc, CollectiveError) and not isinstance(exc, TransportError))
            raise
        finally:
            self._shards.clear()

    def abort(self) -> None:
        """Release this rank's resources without any collective step (for an exception that
        unwinds on this rank only): prefetchers aborted, heap released locally. Peers still reading
        it are safe (see the backend); peers waiting for this rank in a collective step get a
        timeout or a transport error naming it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for pf in self._prefetchers:
            try:
                pf.abort()
            except Exception as exc:
                log.warning("dwdp_comm: aborting a prefetcher failed: %r", exc)
        try:
            self._release_heap(collective=False)
        except Exception as exc:
            log.warning("dwdp_comm: releasing the heap during abort failed: %r", exc)
        self._shards.clear()

    def __enter__(self) -> "WeightStore":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()  # peers may be anywhere: no collective while an exception unwinds
        else:
            self.close()

    # ---- helpers -------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            if self._failed:
                raise ClosedError(f"WeightStore used after a failed commit() ({self._failed}); it was closed")
            raise ClosedError("WeightStore used after close()")
        self.group.check_open()

    def check_committed(self) -> None:
        """Raise :class:`~dwdp_comm.errors.ClosedError` after :meth:`close` (or a failed commit),
        :class:`~dwdp_comm.errors.DwdpError` before :meth:`commit`. Local."""
        self._check_open()
        if not self._committed:
            raise DwdpError("WeightStore is not committed: call the collective commit() first")

    def _layer(self, layer: int) -> dict[str, Placement]:
        self.check_committed()
        ents = self._entries.get(layer) if isinstance(layer, (int, np.integer)) else None
        if ents is None:
            raise bad_arg("layer", layer, f"a registered layer, one of {sorted(self._entries)}")
        return ents

    def _entry(self, layer: int, name: str) -> Placement:
        ents = self._layer(layer)
        if name not in ents:
            raise bad_arg("name", name, f"a name registered for layer {layer}, one of {sorted(ents)}")
        return ents[name]

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("committed" if self._committed else "open")
        return f"WeightStore({state}, layers={sorted(self._entries or self._shards)}, layout={self.layout})"


def _shard_bytes(t: torch.Tensor) -> torch.Tensor:
    """A registered shard as flat bytes (raises for tensors that have no plain byte layout)."""
    if t.layout != torch.strided:
        raise bad_arg("shard", f"a {t.layout} tensor", "a dense (strided) tensor")
    if t.is_meta:
        raise bad_arg("shard", "a tensor on the meta device", "a tensor with data")
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()  # a lazy view: materialise its values
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _runs(experts: tuple[int, ...], lay: ExpertLayout) -> list[tuple[int, int, int]]:
    """Group ascending experts into (owner, first expert, count) runs of consecutive experts."""
    runs: list[tuple[int, int, int]] = []
    for e in experts:
        o = lay.owner(e)
        if runs and runs[-1][0] == o and runs[-1][1] + runs[-1][2] == e:
            runs[-1] = (o, runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((o, e, 1))
    return runs


def _check_registrations(everyone: list[dict], layout: ExpertLayout) -> list[str]:
    """Every disagreement between ranks' registrations, as messages naming layer, name and rank."""
    problems = []
    counts = {r: m["num_experts"] for r, m in enumerate(everyone)}
    if len(set(counts.values())) > 1:
        problems.append(f"ExpertLayout.num_experts differs between ranks: {counts}")
    all_layers = sorted(set().union(*(m["layers"] for m in everyone)))
    if not all_layers:
        problems.append("no tensors registered on any rank: register(layer, name, shard) before commit()")
    for layer in all_layers:
        missing = [r for r, m in enumerate(everyone) if layer not in m["layers"]]
        if missing:
            problems.append(f"layer {layer}: not registered on rank(s) {missing}")
            continue
        names = sorted(set().union(*(m["layers"][layer] for m in everyone)))
        for name in names:
            lacking = [r for r, m in enumerate(everyone) if name not in m["layers"][layer]]
            if lacking:
                problems.append(f"layer {layer}, name {name!r}: not registered on rank(s) {lacking}")
                continue
            desc = {r: m["layers"][layer][name] for r, m in enumerate(everyone)}
            dtypes = {r: d[0] for r, d in desc.items()}
            if len(set(dtypes.values())) > 1:
                problems.append(f"layer {layer}, name {name!r}: dtypes differ: {_by_rank(dtypes)}")
            shapes = {r: d[1] for r, d in desc.items()}
            if len(set(shapes.values())) > 1:
                problems.append(f"layer {layer}, name {name!r}: per-expert shapes differ: {_by_rank(shapes)}")
            for r, d in desc.items():
                want = layout.num_experts_of(r)
                if d[2] != want:
                    ex = layout.experts_of(r)
                    problems.append(f"layer {layer}, name {name!r}, rank {r}: shard has {d[2]} experts, expected "
                                    f"{want} (rank {r} owns experts {ex.start}..{ex.stop - 1})")
    return problems


def _by_rank(d: dict[int, Any]) -> str:
    return ", ".join(f"rank {r}: {v}" for r, v in sorted(d.items()))

"""Where a store's bytes live: the placement types :class:`~dwdp_comm.store.WeightStore` answers with.

Pure host data, no collective: :class:`TensorSpec` (what a registered name is),
:class:`Placement` (where one ``(layer, name)`` lives on this rank, in the heap and in a prefetch
slot) and :class:`SlotView` (which pieces of the slot and of the heap make its
``[num_experts, ...]`` view). The rules that compute them are in :mod:`dwdp_comm.store`'s
docstring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .checks import check_int
from .errors import bad_arg

__all__ = ["TensorSpec", "Placement", "SlotView", "ViewPiece", "as_experts"]

COMPOSITE, GATHER = "composite", "gather"


@dataclass(frozen=True)
class TensorSpec:
    """What a registered name is: element dtype and the shape of one expert's tensor."""

    name: str
    dtype: torch.dtype
    expert_shape: tuple[int, ...]

    @property
    def expert_nbytes(self) -> int:
        """Bytes of one expert's tensor."""
        return math.prod(self.expert_shape) * self.dtype.itemsize


@dataclass(frozen=True)
class ViewPiece:
    """One piece of a :class:`SlotView`: experts ``[first, first + count)`` at bytes
    ``[offset, offset + nbytes)`` of ``source``: ``"slot"`` (the prefetch slot's buffer) or
    ``"heap"`` (this rank's part of the heap, ``store.heap.local``)."""

    first: int
    count: int
    source: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class SlotView:
    """Which view a prefetch slot gives for one (layer, name): the answer of :meth:`WeightStore.slot_view`.

    ``mode="gather"``: one piece, the slot holds all ``num_experts`` experts. ``mode="composite"``:
    the pieces (non-empty, in expert order) are mapped back to back into one range, the local
    experts being the heap pages themselves.
    """

    mode: str
    spec: TensorSpec
    num_experts: int
    pieces: tuple[ViewPiece, ...]

    def typed(self, raw: torch.Tensor) -> torch.Tensor:
        """``raw`` (``uint8``, the bytes of all the pieces back to back) as ``[num_experts, *expert_shape]``."""
        return as_experts(raw, self.spec, self.num_experts)


@dataclass(frozen=True)
class Placement:
    """Where one (layer, name) lives on this rank: the answer of :meth:`WeightStore.placement`.

    Attributes
    ----------
    spec : TensorSpec
        dtype and per-expert shape.
    mode : {"composite", "gather"}
        ``composite``: the slot holds the remote experts only (this rank's block left out) and
        the view maps the heap pages of the local ones; ``gather``: the slot holds every expert.
    heap_offset : int
        Byte offset of this rank's experts of the name in its part of the symmetric heap
        (``store.heap.local``); the same on every rank.
    slot_offset : int
        Byte offset of the name's first row in a prefetch slot.
    num_experts : int
        Experts of the layer (every rank's).
    local_experts : range
        This rank's experts.
    """

    spec: TensorSpec
    mode: str
    heap_offset: int
    slot_offset: int
    num_experts: int
    local_experts: range

    def slot_row(self, expert: int) -> int:
        """Row of global ``expert`` in the slot: ``expert`` itself in gather mode; in composite mode
        the remote experts are packed in global order with this rank's block left out.

        Raises
        ------
        InvalidArgumentError
            ``expert`` is out of range, or local in composite mode (not in the slot).
        InvalidTypeError
            ``expert`` is not an int.
        """
        expert = check_int("expert", expert, low=0, high=self.num_experts - 1)
        if self.mode == GATHER:
            return expert
        local = self.local_experts
        if expert in local:
            raise bad_arg("expert", expert, "a remote expert (local experts are not in the slot)")
        return expert if expert < local.start else expert - len(local)

    def view(self) -> SlotView:
        """The pieces of the slot and of this rank's heap part that make the ``[num_experts, ...]``
        tensor of a prefetch slot (see :class:`SlotView`)."""
        nb, num = self.spec.expert_nbytes, self.num_experts
        if self.mode == GATHER:
            return SlotView(GATHER, self.spec, num, (ViewPiece(0, num, "slot", self.slot_offset, num * nb),))
        first, nl = self.local_experts.start, len(self.local_experts)
        after = num - first - nl
        pieces = (ViewPiece(0, first, "slot", self.slot_offset, first * nb),
                  ViewPiece(first, nl, "heap", self.heap_offset, nl * nb),
                  ViewPiece(first + nl, after, "slot", self.slot_offset + first * nb, after * nb))
        return SlotView(COMPOSITE, self.spec, num, tuple(p for p in pieces if p.count))


def as_experts(raw: torch.Tensor, spec: TensorSpec, count: int) -> torch.Tensor:
    """View ``raw`` bytes as ``[count, *expert_shape]`` of the spec's dtype."""
    return raw.view(spec.dtype).view(count, *spec.expert_shape)

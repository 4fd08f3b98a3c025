"""Which rank owns which routed expert.

Rule (contiguous blocks, sizes differ by at most one): with ``E`` experts and ``G`` ranks, rank ``r``
owns ``E // G + (1 if r < E % G else 0)`` experts, and ranks own consecutive blocks in rank order.
So with 10 experts on 4 ranks the blocks are ``[0,1,2] [3,4,5] [6,7] [8,9]``. Contiguous blocks
keep every owner's experts one contiguous byte range in the heap, which lets a plan copy a whole
owner's range at once and lets a composite view map each owner's block with a single mapping.
"""

from __future__ import annotations

from .checks import check_int
from .errors import bad_arg

__all__ = ["ExpertLayout"]


class ExpertLayout:
    """Maps each global expert to ``(owner rank, local index)`` and back.

    Rule: ranks own contiguous blocks of experts in rank order, and block sizes differ by at most
    one: rank ``r`` owns ``num_experts // group_size + (1 if r < num_experts % group_size else 0)``
    experts (10 experts on 4 ranks: ``[0,1,2] [3,4,5] [6,7] [8,9]``). Pure host computation, no
    collective.

    Parameters
    ----------
    num_experts : int
        Routed experts per MoE layer (>= group_size, so that every rank owns at least one).
    group_size : int
        Ranks in the DWDP group.
    rank : int
        This rank, in ``[0, group_size)``.

    Examples
    --------
    >>> lay = ExpertLayout(num_experts=10, group_size=4, rank=2)
    >>> lay.local_experts, lay.owner(9), lay.local_index(9)
    (range(6, 8), 3, 1)
    """

    def __init__(self, num_experts: int, group_size: int, rank: int):
        self.group_size = check_int("group_size", group_size, low=1)
        self.num_experts = check_int("num_experts", num_experts, low=1)
        if self.num_experts < self.group_size:
            raise bad_arg("num_experts", self.num_experts, f"at least group_size={self.group_size}",
                          "every rank must own at least one expert")
        self.rank = check_int("rank", rank, low=0, high=self.group_size - 1)
        base, extra = divmod(self.num_experts, self.group_size)
        self._base, self._extra = base, extra
        # first[r] = first global expert of rank r; first[G] = E.
        self._first = [r * base + min(r, extra) for r in range(self.group_size + 1)]

    # ---- per rank ---------------------------------------------------------------------------
    def num_experts_of(self, rank: int) -> int:
        """Number of experts owned by ``rank``."""
        rank = self._check_rank(rank)
        return self._first[rank + 1] - self._first[rank]

    def first_expert(self, rank: int) -> int:
        """Global index of the first expert owned by ``rank``."""
        rank = self._check_rank(rank)
        return self._first[rank]

    def experts_of(self, rank: int) -> range:
        """Global experts owned by ``rank`` (a contiguous range)."""
        rank = self._check_rank(rank)
        return range(self._first[rank], self._first[rank + 1])

    @property
    def max_local_experts(self) -> int:
        """The largest shard: the per-rank expert capacity of the symmetric heap."""
        return self._base + (1 if self._extra else 0)

    # ---- this rank --------------------------------------------------------------------------
    @property
    def num_local_experts(self) -> int:
        """Number of experts this rank owns (its shard's first dimension)."""
        return self.num_experts_of(self.rank)

    @property
    def local_experts(self) -> range:
        """Global experts this rank owns."""
        return self.experts_of(self.rank)

    @property
    def remote_experts(self) -> list[int]:
        """Global experts owned by other ranks, ascending."""
        lo, hi = self._first[self.rank], self._first[self.rank + 1]
        return [e for e in range(self.num_experts) if e < lo or e >= hi]

    # ---- global <-> (owner, local) ----------------------------------------------------------
    def owner(self, expert: int) -> int:
        """Rank that owns global ``expert``."""
        expert = self._check_expert(expert)
        # Ranks below `extra` hold base+1 experts; the rest hold base.
        big = self._extra * (self._base + 1)
        if expert < big:
            return expert // (self._base + 1)
        return self._extra + (expert - big) // self._base

    def local_index(self, expert: int) -> int:
        """Index of global ``expert`` inside its owner's shard."""
        return expert - self._first[self.owner(expert)]

    def global_expert(self, rank: int, local_index: int) -> int:
        """Global index of the ``local_index``-th expert of ``rank``."""
        rank = self._check_rank(rank)
        n = self._first[rank + 1] - self._first[rank]
        local_index = check_int("local_index", local_index, low=0, high=n - 1,
                                expected=f"an int in [0, {n}) for rank {rank}")
        return self._first[rank] + local_index

    def is_local(self, expert: int) -> bool:
        """True when this rank owns global ``expert``."""
        return self.owner(expert) == self.rank

    # ---- helpers ----------------------------------------------------------------------------
    def _check_rank(self, rank: int) -> int:
        return check_int("rank", rank, low=0, high=self.group_size - 1)

    def _check_expert(self, expert: int) -> int:
        return check_int("expert", expert, low=0, high=self.num_experts - 1)

    def for_rank(self, rank: int) -> "ExpertLayout":
        """The same layout seen from another rank."""
        return ExpertLayout(self.num_experts, self.group_size, rank)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, ExpertLayout) and other.num_experts == self.num_experts
                and other.group_size == self.group_size and other.rank == self.rank)

    def __hash__(self) -> int:
        return hash((self.num_experts, self.group_size, self.rank))

    def __repr__(self) -> str:
        return (f"ExpertLayout(num_experts={self.num_experts}, group_size={self.group_size}, "
                f"rank={self.rank}, local_experts={self.local_experts})")

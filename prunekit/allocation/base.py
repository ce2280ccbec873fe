"""The allocation axis: how much of each layer to prune, given the overall target."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from torch import Tensor

from ..registry import Registry

if TYPE_CHECKING:
    from ..config import Allocation


@dataclass(frozen=True)
class LayerRef:
    """A candidate layer as allocation sees it. ``scores()`` computes its (out, in) allocation
    scores on demand, so only one layer's scores are in memory at a time. ``shape`` is the
    parameter's own shape (e.g. ``(out, in, kh, kw)`` for a convolution) for rules that use
    it (ERK); None means the (out, in) view is the shape."""

    name: str
    block: int
    numel: int
    scores: Callable[[], Tensor]
    shape: tuple[int, ...] | None = None


AllocateFn = Callable[[Sequence[LayerRef], float, "Allocation"], list[float]]


@dataclass(frozen=True)
class AllocationRule:
    fn: AllocateFn
    uses_scores: bool  # False when the rule ignores the weights (uniform)

    def __call__(self, layers: Sequence[LayerRef], sparsity: float, cfg: Allocation) -> list[float]:
        return self.fn(layers, sparsity, cfg)


ALLOCATIONS: Registry[AllocationRule] = Registry("allocation")


def register_allocation(name: str, *, uses_scores: bool = True) -> Callable[[AllocateFn], AllocateFn]:
    def add(fn: AllocateFn) -> AllocateFn:
        ALLOCATIONS.register(name)(AllocationRule(fn, uses_scores))
        return fn

    return add

"""Patterns: which shapes the zeros may take. ``(scores (out, in), amount) -> mask``, True = prune."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from ..registry import Registry
from .nm import check_nm_shape, is_nm, nm_mask
from .unstructured import count_for, lowest_overall, lowest_per_row, unstructured_mask

MaskFn = Callable[..., Tensor]
PATTERNS: Registry[MaskFn] = Registry("pattern")
PATTERNS.register("unstructured")(unstructured_mask)
PATTERNS.register("nm", paper="Mishra et al. 2021, Accelerating Sparse Deep Neural Networks (2:4 sparsity)")(nm_mask)


@dataclass(frozen=True)
class MaskSpec:
    """The pattern resolved for one layer: kind, its amount and comparison group, or N:M."""

    kind: str = "unstructured"
    amount: float = 0.0
    group: str = "row"
    n: int = 0
    m: int = 0

    def mask(self, scores: Tensor) -> Tensor:
        """(out, in) scores -> (out, in) bool mask, True = prune."""
        if self.kind == "nm":
            return PATTERNS.get("nm")(scores, self.n, self.m)
        return PATTERNS.get(self.kind)(scores, self.amount, self.group)


__all__ = [
    "PATTERNS", "MaskSpec", "unstructured_mask", "nm_mask", "is_nm", "check_nm_shape",
    "lowest_per_row", "lowest_overall", "count_for",
]

"""The one rounding rule of prunekit: how many of ``n`` elements or units a fraction removes.

``count(r, n) = floor(r * n + 1/2)``: halves round up (Python's ``round`` would send 7.5 to 8
but 6.5 to 6), with a small tolerance so 0.3 * 10 (2.9999...) counts 3. Weights, N:M grids
aside, units of a group, blocks, experts and allocation budgets all use it; structural
pruning additionally keeps at least one unit per group.
"""
from __future__ import annotations

import math


def count(ratio: float, n: int) -> int:
    """Elements removed out of ``n`` at fraction ``ratio`` (round half up)."""
    return int(math.floor(ratio * n + 0.5 + 1e-9))


__all__ = ["count"]

"""Allocation over groups of units (structural pruning): how many units each group loses,
and which ones. The layer-level rules (uniform, global, OWL, ERK...) are the registered
entries of this package; these are their counterparts for groups.

Pure functions of per-group scores: uniform (each group loses its ratio), global (one
threshold over scores normalised by each group's mean, as in Torch-Pruning's global
ranking), per-group overrides, rounding kept counts to a multiple.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError
from ..rounding import count


def count_to_remove(n: int, ratio: float, round_to: int, name: str) -> int:
    """Units to remove from a group of ``n`` so ``n - k`` is a multiple of ``round_to``."""
    k = count(ratio, n)
    if round_to > 1 and k > 0:
        kept = max(round_to, count(1.0, (n - k) / round_to) * round_to)
        k = max(n - kept, 0)
    if k >= n:
        raise ConfigError(
            f"ratio {ratio} would remove all {n} units of {name}; a group must keep at least one "
            f"unit, so use a ratio below {(n - 0.5) / n:.3f} or leave it whole with ignore=[{name!r}]"
        )
    return k


def smallest_ratio(n: int, round_to: int = 1) -> float | None:
    """The smallest ratio that removes at least one of ``n`` units (None if none can while
    one unit stays): ``(j - 1/2) / n`` for the first count ``j`` that survives ``round_to``."""
    for j in range(1, n):
        ratio = (j - 0.5) / n
        try:
            if count_to_remove(n, ratio, round_to, "") > 0:
                return ratio
        except ConfigError:
            return None
    return None


def lowest(scores: Tensor, k: int) -> list[int]:
    """Indices of the ``k`` lowest scores (ties broken by position, so results are stable)."""
    return sorted(torch.argsort(scores, stable=True)[:k].tolist()) if k > 0 else []


def uniform(scores: list[Tensor], ratios: list[float], round_to: int, names: list[str]) -> list[list[int]]:
    """Per group, the lowest-scoring ``ratio`` of its units."""
    return [lowest(s, count_to_remove(s.numel(), r, round_to, n)) for s, r, n in zip(scores, ratios, names)]


def global_threshold(scores: list[Tensor], ratio: float, names: list[str]) -> list[list[int]]:
    """The lowest ``ratio`` of all units, ranking scores divided by their group's mean;
    every group keeps at least one unit."""
    normed = [s / s.mean() if float(s.mean()) > 0 else torch.ones_like(s) for s in scores]
    flat = torch.cat(normed)
    owner = torch.cat([torch.full((s.numel(),), i) for i, s in enumerate(scores)])
    budget = count(ratio, flat.numel())
    left = [s.numel() for s in scores]
    chosen: list[list[int]] = [[] for _ in scores]
    offsets = [0]
    for s in scores:
        offsets.append(offsets[-1] + s.numel())
    for idx in torch.argsort(flat, stable=True).tolist():
        if budget == 0:
            break
        g = int(owner[idx])
        if left[g] > 1:
            chosen[g].append(idx - offsets[g])
            left[g] -= 1
            budget -= 1
    if budget > 0:
        raise ConfigError(f"global ratio {ratio} cannot be met while every group keeps one unit ({names})")
    return [sorted(c) for c in chosen]

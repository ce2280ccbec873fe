"""Dynamic sparse training: drop and regrow connections at a fixed density.

- SET (Mocanu et al. 2018, "Scalable training of artificial neural networks with adaptive
  sparse connectivity inspired by network science"): drop the smallest-magnitude active
  weights, regrow as many at random positions.
- RigL (Evci et al. 2020, "Rigging the Lottery: Making All Tickets Winners"): drop the
  smallest-magnitude active weights, regrow where the dense gradient is largest.

Both as in the RigL paper: every ``update_every`` steps until ``end``, each layer swaps a
fraction ``alpha / 2 * (1 + cos(pi * t / end))`` of its active weights (cosine decay); the
initial mask is random with ERK layer densities; regrown weights (and their optimizer
state) start at zero. With an N:M pattern a swap happens inside a group of M (its weakest
active weight for its best inactive one), so every mask stays N:M.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from ..config import Pattern
from ..errors import ScheduleError
from ..masking import as_2d
from .base import (Masks, PruneContext, check_pattern_target, check_target, random_scores,
                   select_masks)


@dataclass(frozen=True)
class DynamicSparse:
    """SET (``method="set"``) or RigL (``method="rigl"``) at constant ``sparsity``;
    ``method="static"`` keeps the same initial mask fixed (the static sparse-training baseline).

    ``update_every``: ΔT steps between updates; ``alpha``: initial update fraction; ``end``:
    last update step (the RigL paper stops at 75% of training); ``allocation``: initial
    layer densities (``erk`` as in the paper, or ``uniform``; not used with N:M, which fixes
    every layer's density); ``pattern``: unstructured or N:M.
    """

    method: Literal["static", "set", "rigl"]
    sparsity: float
    update_every: int = 100
    alpha: float = 0.3
    end: int = 10_000
    allocation: str = "erk"
    pattern: Pattern = field(default_factory=Pattern)

    def __post_init__(self) -> None:
        if self.method not in ("static", "set", "rigl"):
            raise ScheduleError(f"unknown dynamic sparse method {self.method!r}; use 'static', 'set' or 'rigl'")
        check_target(self.sparsity, "sparsity")
        check_pattern_target(self.pattern, self.sparsity)
        if self.update_every < 1 or self.end < 1:
            raise ScheduleError(f"update_every ({self.update_every}) and end ({self.end}) must be >= 1 step")
        if not 0.0 < self.alpha <= 1.0:
            raise ScheduleError(f"alpha {self.alpha} must be in (0, 1]: the fraction of active weights swapped")

    def is_update(self, step: int) -> bool:
        return self.method != "static" and 0 < step < self.end and step % self.update_every == 0

    def update_fraction(self, step: int) -> float:
        """Cosine-decayed fraction of each layer's active weights swapped at ``step``."""
        return self.alpha / 2.0 * (1.0 + math.cos(math.pi * step / self.end))

    def sparsity_at(self, step: int) -> float:
        return self.sparsity

    def needs_dense_grads(self, step: int) -> bool:
        return self.method == "rigl" and self.is_update(step)

    def initial_masks(self, ctx: PruneContext) -> Masks:
        return select_masks(random_scores(ctx.weights, ctx.generator), self.sparsity,
                            allocation=self.allocation, pattern=self.pattern, transposed=ctx.transposed)

    def update(self, step: int, ctx: PruneContext) -> Masks | None:
        if not self.is_update(step):
            return None
        frac = self.update_fraction(step)
        out = {}
        for name, w in ctx.weights.items():
            grow = self._grow_scores(name, w, ctx)
            swap = swap_nm if self.pattern.kind == "nm" else swap_unstructured
            out[name] = swap(as_2d(w.detach().abs()), as_2d(grow), as_2d(ctx.masks[name]), frac,
                             self.pattern.m).view(w.shape)
        return out

    def _grow_scores(self, name: str, w: Tensor, ctx: PruneContext) -> Tensor:
        if self.method == "set":
            return torch.rand(w.shape, generator=ctx.generator).to(w.device)
        grad = ctx.dense_grads.get(name)
        if grad is None:
            raise ScheduleError(
                f"RigL needs the dense gradient of {name} at step updates; call controller.step() after "
                "every optimizer.step(), with a backward pass in between"
            )
        return grad.abs()


def swap_unstructured(mag: Tensor, grow: Tensor, pruned: Tensor, frac: float, m: int = 0) -> Tensor:
    """Drop the ``k = floor(frac * active)`` smallest active ``mag`` and regrow the ``k``
    highest ``grow`` among the positions pruned after the drop. All ``(out, in)``; returns
    the new mask (True = pruned) with the same count."""
    active = ~pruned
    k = int(frac * int(active.sum()))
    if k == 0:
        return pruned
    drop_scores = mag.masked_fill(pruned, float("inf")).reshape(-1)  # (numel,)
    dropped = torch.topk(drop_scores, k, largest=False).indices
    new_pruned = pruned.clone().reshape(-1)
    new_pruned[dropped] = True
    # Just-dropped positions may be regrown, as in RigL's reference code.
    grow_scores = grow.reshape(-1).float().masked_fill(~new_pruned, -float("inf"))
    grown = torch.topk(grow_scores, k).indices
    new_pruned[grown] = False
    return new_pruned.view(pruned.shape)


def swap_nm(mag: Tensor, grow: Tensor, pruned: Tensor, frac: float, m: int) -> Tensor:
    """N:M swap: in the ``floor(frac * active)`` groups (at most one swap per group) whose
    weakest active weight is smallest, swap it for the group's best inactive ``grow``."""
    out_f, in_f = pruned.shape
    groups = out_f * (in_f // m)
    p = pruned.reshape(groups, m)  # (groups, m)
    active_mag = mag.reshape(groups, m).masked_fill(p, float("inf"))
    weakest_val, weakest = active_mag.min(dim=1)  # (groups,)
    best = grow.reshape(groups, m).float().masked_fill(~p, -float("inf")).argmax(dim=1)  # (groups,)
    has_free = p.any(dim=1)
    k = min(int(frac * int((~p).sum())), int(has_free.sum()))
    if k == 0:
        return pruned
    order = weakest_val.masked_fill(~has_free, float("inf"))
    chosen = torch.topk(order, k, largest=False).indices  # (k,)
    new = p.clone()
    new[chosen, weakest[chosen]] = True
    new[chosen, best[chosen]] = False
    return new.view(out_f, in_f)

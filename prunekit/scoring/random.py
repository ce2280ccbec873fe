"""Random scores: the control every pruning paper compares against. :func:`uniform_scores` is
the one random draw of prunekit: element, unit, layer, expert and at-initialisation scores
all draw through it."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import LayerStats, register_score


def uniform_scores(shape: tuple[int, ...] | int, generator: torch.Generator | None,
                   like: Tensor | None = None) -> Tensor:
    """Uniform [0, 1) scores of ``shape``, drawn on the CPU (so a seed gives the same choice on
    every device), then placed on ``like``'s device and dtype."""
    scores = torch.rand(shape, generator=generator, dtype=torch.float32)
    return scores if like is None else scores.to(device=like.device, dtype=like.dtype)


@register_score("random", default_group="layer")
def random(weight: Tensor, stats: LayerStats) -> Tensor:
    """Seeded uniform random scores: the control."""
    return uniform_scores(tuple(weight.shape), stats.generator, weight)  # (out, in)

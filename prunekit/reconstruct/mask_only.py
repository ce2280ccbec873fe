"""No reconstruction: score each layer once, mask, and zero the pruned weights."""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from .base import RECONSTRUCTIONS, GroupProblem


def choose_masks(problem: GroupProblem) -> Tensor:
    """(out, in) bool mask, True = prune: each segment's pattern applied to its scores."""
    stats = problem.stats
    if "hessian" in problem.score.needs:
        upper, _ = problem.inverse_factor()  # U^T U = H^-1: [H^-1]_jj is column j's squared norm
        stats = replace(stats, hinv_sqrt_diag=upper.square().sum(dim=0).sqrt())
    weight = problem.weight  # (out, in)
    pruned = torch.empty_like(weight, dtype=torch.bool)
    for seg in problem.segments:
        rows = weight[seg.start : seg.stop]
        pruned[seg.start : seg.stop] = seg.spec.mask(problem.score(rows, stats))
    return pruned


@RECONSTRUCTIONS.register("none")
def mask_only(problem: GroupProblem) -> tuple[Tensor, Tensor]:
    """Mask each layer once and zero the pruned weights."""
    pruned = choose_masks(problem)
    return problem.weight.masked_fill(pruned, 0.0), pruned

"""No reconstruction: score each layer once, mask, and zero the pruned weights."""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from .base import RECONSTRUCTIONS, GroupProblem


def element_scores(problem: GroupProblem) -> Tensor:
    """(out, in) the score of every weight of the stacked group, higher = keep, each layer
    scored on its own rows (a relative score such as RIA's normalises within its layer)."""
    stats = problem.stats
    if "hessian" in problem.score.needs:
        upper, _ = problem.inverse_factor()  # U^T U = H^-1: [H^-1]_jj is column j's squared norm
        stats = replace(stats, hinv_sqrt_diag=upper.square().sum(dim=0).sqrt())
    weight = problem.weight  # (out, in)
    grad = stats.grad
    parts = []
    for seg in problem.segments:
        rows = slice(seg.start, seg.stop)
        seg_stats = stats if grad is None else replace(stats, grad=grad[rows])  # a stacked group's gradient rows
        parts.append(problem.score(weight[rows], seg_stats).float())
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def choose_masks(problem: GroupProblem) -> Tensor:
    """(out, in) bool mask, True = prune: each segment's pattern applied to its scores."""
    scores = element_scores(problem)  # (out, in)
    pruned = torch.empty_like(scores, dtype=torch.bool)
    for seg in problem.segments:
        pruned[seg.start : seg.stop] = seg.spec.mask(scores[seg.start : seg.stop])
    return pruned


@RECONSTRUCTIONS.register("none")
def mask_only(problem: GroupProblem) -> tuple[Tensor, Tensor]:
    """Mask each layer once and zero the pruned weights."""
    pruned = choose_masks(problem)
    return problem.weight.masked_fill(pruned, 0.0), pruned

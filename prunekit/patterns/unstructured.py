"""Unstructured masks: prune the lowest scores within each row or within the whole layer."""
from __future__ import annotations

import torch
from torch import Tensor

from ..rounding import count


def count_for(amount: float, size: int) -> int:
    """Number of elements pruned out of ``size`` at fraction ``amount`` (:mod:`prunekit.rounding`)."""
    return count(amount, size)


def lowest_per_row(scores: Tensor, k: int) -> Tensor:
    """Mask (True = prune) of the ``k`` lowest scores of every row of ``scores`` (out, in)."""
    pruned = torch.zeros_like(scores, dtype=torch.bool)  # (out, in)
    if k > 0:
        idx = torch.topk(scores, k, dim=1, largest=False, sorted=False).indices  # (out, k), any order
        pruned.scatter_(1, idx, True)
    return pruned


def lowest_overall(scores: Tensor, k: int) -> Tensor:
    """Mask (True = prune) of the ``k`` lowest scores of the whole tensor."""
    flat = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        idx = torch.topk(scores.reshape(-1), k, largest=False, sorted=False).indices  # (k,)
        flat[idx] = True
    return flat.view(scores.shape)


def unstructured_mask(scores: Tensor, amount: float, group: str) -> Tensor:
    """Any weights: the lowest scores per row or layer.

    Prunes fraction ``amount`` of ``scores`` (out, in), compared per ``row`` or per ``layer``."""
    if group == "row":
        return lowest_per_row(scores, count_for(amount, scores.shape[1]))
    return lowest_overall(scores, count_for(amount, scores.numel()))

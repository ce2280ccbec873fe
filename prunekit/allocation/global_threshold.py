"""Global allocation: one score threshold across all layers (as in global magnitude pruning,
e.g. Frankle & Carbin 2019); each layer's amount is the fraction of its scores below it."""
from __future__ import annotations

from typing import Sequence

from ..rounding import count
from .base import LayerRef, register_allocation


def _counts(layers: Sequence[LayerRef], t: float) -> list[int]:
    return [int((layer.scores() <= t).sum()) for layer in layers]


@register_allocation("global")
def global_threshold(layers: Sequence[LayerRef], sparsity: float, cfg: object, iters: int = 40) -> list[float]:
    """One score threshold across all layers.

    Bisect the threshold t with sum_l #(score_l <= t) = k, recomputing scores per step so
    memory stays at one layer; ties at t are shared in proportion to their counts."""
    total = sum(layer.numel for layer in layers)
    k = count(sparsity, total)
    if k == 0:
        return [0.0] * len(layers)
    lo = min(float(layer.scores().min()) for layer in layers)
    hi = max(float(layer.scores().max()) for layer in layers)
    lo = lo - abs(lo) * 1e-6 - 1e-30  # strictly below every score: #(<= lo) = 0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if sum(_counts(layers, mid)) < k:
            lo = mid
        else:
            hi = mid
    below, upto = _counts(layers, lo), _counts(layers, hi)  # sum(below) < k <= sum(upto)
    extra = k - sum(below)
    ties = sum(upto) - sum(below)
    return [
        min((b + extra * (u - b) / ties) / layer.numel, 1.0)
        for layer, b, u in zip(layers, below, upto)
    ]

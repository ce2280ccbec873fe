"""Global threshold with a minimum kept per layer: one score threshold across layers (global
magnitude pruning, e.g. Frankle & Carbin 2019), except that no layer may lose more than
``1 - floor * (1 - sparsity)`` of its weights. Global pruning alone can empty a small layer
and disconnect the network ("layer collapse", Tanaka et al. 2020, "Pruning neural networks
without any data by iteratively conserving synaptic flow"); the floor keeps every layer at
least ``floor`` times the average density."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ..errors import ConfigError
from ..rounding import count
from .base import LayerRef, register_allocation

#: Each layer keeps at least this fraction of the network's average density.
DEFAULT_FLOOR = 0.25


@dataclass(frozen=True)
class GlobalMinParams:
    """``floor``: every layer keeps at least this fraction of the network's average density."""

    floor: float = DEFAULT_FLOOR

    def __post_init__(self) -> None:
        if not isinstance(self.floor, (int, float)) or not 0 <= self.floor <= 1:
            raise ConfigError(f"global_min needs 0 <= floor <= 1, got {self.floor!r}")


def _capped_counts(layers: Sequence[LayerRef], caps: Sequence[int], t: float) -> list[int]:
    return [min(int((layer.scores() <= t).sum()), cap) for layer, cap in zip(layers, caps)]


def global_with_minimum(layers: Sequence[LayerRef], sparsity: float, floor: float = DEFAULT_FLOOR,
                        iters: int = 60) -> list[float]:
    """Per-layer amounts from a capped global threshold: bisect t with
    ``sum_l min(#(score_l <= t), cap_l) = k``, ``cap_l = numel_l - ceil(floor (1-s) numel_l)``;
    ties at t are shared in proportion to their counts."""
    total = sum(layer.numel for layer in layers)
    k = count(sparsity, total)
    if k == 0:
        return [0.0] * len(layers)
    caps = [layer.numel - math.ceil(floor * (1.0 - sparsity) * layer.numel) for layer in layers]
    lo = min(float(layer.scores().min()) for layer in layers)
    hi = max(float(layer.scores().max()) for layer in layers)
    lo = lo - abs(lo) * 1e-6 - 1e-30  # strictly below every score
    for _ in range(iters):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if sum(_capped_counts(layers, caps, mid)) < k:
            lo = mid
        else:
            hi = mid
    below, upto = _capped_counts(layers, caps, lo), _capped_counts(layers, caps, hi)
    extra, ties = k - sum(below), sum(upto) - sum(below)
    return [(b + (extra * (u - b) / ties if ties else 0)) / layer.numel
            for layer, b, u in zip(layers, below, upto)]


@register_allocation("global_min", params=GlobalMinParams)
def global_min(layers: Sequence[LayerRef], sparsity: float, params: GlobalMinParams) -> list[float]:
    """Global threshold, a minimum density per layer."""
    return global_with_minimum(layers, sparsity, params.floor)

"""Erdős–Rényi-Kernel allocation (Evci et al. 2020, "Rigging the Lottery: Making All Tickets
Winners"; ER for MLPs from Mocanu et al. 2018, "Scalable training of artificial neural
networks with adaptive sparse connectivity").

A layer of shape ``(out, in, k1, k2, ...)`` gets density proportional to
``(out + in + k1 + k2 + ...) / (out * in * k1 * k2 * ...)``: small layers stay denser. The
common factor is solved so the overall density is ``1 - sparsity``; a layer whose density
would exceed 1 is kept dense and the factor is solved again over the others.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..errors import ConfigError
from .base import LayerRef, register_allocation


@dataclass(frozen=True)
class ErkParams:
    """``power`` scales the raw per-layer ratio (1.0 as in the paper)."""

    power: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.power, (int, float)) or not self.power > 0:
            raise ConfigError(f"ERK needs power > 0, got {self.power!r}")


def _shape(layer: LayerRef) -> tuple[int, ...]:
    return tuple(layer.shape) if layer.shape is not None else tuple(layer.scores().shape)


def erk_densities(shapes: Sequence[tuple[int, ...]], sparsity: float, power: float = 1.0) -> list[float]:
    """ERK densities for parameter ``shapes`` at overall ``sparsity``; ``power`` scales the
    raw ratio (1.0 as in the paper). Pure arithmetic, no tensors."""
    numels = [_prod(s) for s in shapes]
    raw = [(sum(s) / _prod(s)) ** power for s in shapes]  # per-element density before scaling
    budget = (1.0 - sparsity) * sum(numels)
    dense: set[int] = set()
    while True:
        free = [i for i in range(len(shapes)) if i not in dense]
        rest = budget - sum(numels[i] for i in dense)
        denom = sum(raw[i] * numels[i] for i in free)
        eps = rest / denom if denom > 0 else 0.0
        over = [i for i in free if eps * raw[i] > 1.0]
        if not over:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(shapes))]
        dense.add(max(over, key=lambda i: raw[i]))


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


@register_allocation("erk", uses_scores=False, params=ErkParams,
                     paper="Evci et al. 2020, Rigging the Lottery: Making All Tickets Winners (RigL, ERK)")
def erk(layers: Sequence[LayerRef], sparsity: float, params: ErkParams) -> list[float]:
    """Erdős–Rényi-Kernel: smaller layers stay denser."""
    return [1.0 - d for d in erk_densities([_shape(layer) for layer in layers], sparsity, params.power)]

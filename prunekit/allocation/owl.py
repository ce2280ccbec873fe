"""OWL, outlier-weighted layerwise sparsity (Yin et al. 2024, "Outlier Weighed Layerwise
Sparsity: A Missing Secret Sauce for Pruning LLMs to High Sparsity").

Each block's outlier ratio D_b is the fraction of its scores above M x the block's mean
score. Sparsities are 1 - D_b rescaled into [s - lambda, s + lambda] with mean s, so blocks
rich in outliers are pruned less."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch

from ..errors import ConfigError
from .base import LayerRef, register_allocation


@dataclass(frozen=True)
class OwlParams:
    """OWL's outlier threshold ``m`` (a weight is an outlier above m x its block's mean score)
    and spread ``lambda`` (sparsities range over [s - lambda, s + lambda]); paper defaults."""

    m: float = 5.0
    lam: float = 0.08
    ALIASES: ClassVar[dict[str, str]] = {"lambda": "lam"}

    def __post_init__(self) -> None:
        if not isinstance(self.m, (int, float)) or not isinstance(self.lam, (int, float)) \
                or not self.m > 0 or not 0 <= self.lam < 0.5:
            raise ConfigError(f"OWL needs m > 0 and 0 <= lambda < 0.5, got m={self.m!r}, lambda={self.lam!r}")


def outlier_ratios(layers: Sequence[LayerRef], m: float) -> dict[int, float]:
    """Fraction of scores above ``m`` x mean score, per block (all of its layers together)."""
    by_block: dict[int, list[LayerRef]] = defaultdict(list)
    for layer in layers:
        by_block[layer.block].append(layer)
    ratios = {}
    for block, members in by_block.items():
        total = sum(float(layer.scores().double().sum()) for layer in members)
        numel = sum(layer.numel for layer in members)
        thresh = m * total / numel
        ratios[block] = sum(int((layer.scores() > thresh).sum()) for layer in members) / numel
    return ratios


def owl_sparsities(ratios: torch.Tensor, sparsity: float, lam: float) -> torch.Tensor:
    """Map outlier ratios (blocks,) to sparsities (blocks,) with mean ``sparsity``."""
    spread = ratios.max() - ratios.min()
    scaled = (ratios - ratios.min()) / spread * (2 * lam) if spread > 0 else torch.zeros_like(ratios)
    density = scaled - scaled.mean() + (1.0 - sparsity)
    return (1.0 - density).clamp(0.0, 0.999)


@register_allocation("owl", params=OwlParams,
                     paper="Yin et al. 2024, Outlier Weighed Layerwise Sparsity: A Missing Secret Sauce for Pruning "
                           "LLMs to High Sparsity (OWL)")
def owl(layers: Sequence[LayerRef], sparsity: float, params: OwlParams) -> list[float]:
    """Outlier-weighted layerwise sparsity."""
    ratios = outlier_ratios(layers, params.m)
    blocks = sorted(ratios)
    per_block = owl_sparsities(torch.tensor([ratios[b] for b in blocks], dtype=torch.float64), sparsity, params.lam)
    lookup = dict(zip(blocks, per_block.tolist()))
    return [lookup[layer.block] for layer in layers]

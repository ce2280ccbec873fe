"""OWL, outlier-weighted layerwise sparsity (Yin et al. 2024, "Outlier Weighed Layerwise
Sparsity: A Missing Secret Sauce for Pruning LLMs to High Sparsity").

Each block's outlier ratio D_b is the fraction of its scores above M x the block's mean
score. Sparsities are 1 - D_b rescaled into [s - lambda, s + lambda] with mean s, so blocks
rich in outliers are pruned less."""
from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Sequence

import torch

from .base import LayerRef, register_allocation

if TYPE_CHECKING:
    from ..config import Allocation


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


@register_allocation("owl")
def owl(layers: Sequence[LayerRef], sparsity: float, cfg: Allocation) -> list[float]:
    ratios = outlier_ratios(layers, cfg.owl_m)
    blocks = sorted(ratios)
    per_block = owl_sparsities(torch.tensor([ratios[b] for b in blocks], dtype=torch.float64), sparsity, cfg.owl_lambda)
    lookup = dict(zip(blocks, per_block.tolist()))
    return [lookup[layer.block] for layer in layers]

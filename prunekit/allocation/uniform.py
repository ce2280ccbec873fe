"""Uniform allocation: every layer gets the target sparsity."""
from __future__ import annotations

from typing import Sequence

from .base import LayerRef, register_allocation


@register_allocation("uniform", uses_scores=False)
def uniform(layers: Sequence[LayerRef], sparsity: float, cfg: object) -> list[float]:
    """Every layer gets the target sparsity."""
    return [sparsity] * len(layers)

"""Magnitude score |W| (Han et al. 2015, "Learning both Weights and Connections")."""
from torch import Tensor

from .base import LayerStats, register_score


@register_score("magnitude", default_group="layer")
def magnitude(weight: Tensor, stats: LayerStats) -> Tensor:
    return weight.abs()  # (out, in)

"""Magnitude score |W| (Han et al. 2015, "Learning both Weights and Connections")."""
from torch import Tensor

from .base import LayerStats, register_score


@register_score("magnitude", default_group="layer",
                paper="Han et al. 2015, Learning both Weights and Connections for Efficient Neural Networks")
def magnitude(weight: Tensor, stats: LayerStats) -> Tensor:
    """Weight magnitude |W| (data-free)."""
    return weight.abs()  # (out, in)

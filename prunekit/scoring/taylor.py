"""First-order Taylor score |W ⊙ ∂L/∂W|: the loss change estimated when a weight is removed
(Molchanov et al., "Pruning Convolutional Neural Networks for Resource Efficient Inference",
ICLR 2017); at initialisation it is SNIP's connection sensitivity (Lee et al., "SNIP:
Single-shot Network Pruning based on Connection Sensitivity", ICLR 2019). Structural Taylor
scores aggregate the same first-order term over a unit (:func:`first_order`, squared after
summing, as Molchanov et al. 2019 do for whole filters)."""
from __future__ import annotations

from torch import Tensor

from .base import LayerStats, register_score


def first_order(weight: Tensor, grad: Tensor) -> Tensor:
    """The signed first-order term ``w * dL/dw`` of removing each weight."""
    return weight * grad.to(weight.dtype)


@register_score("taylor", needs=("grad",), default_group="layer",
                paper="Molchanov et al. 2017, Pruning Convolutional Neural Networks for Resource Efficient Inference")
def taylor(weight: Tensor, stats: LayerStats) -> Tensor:
    """First-order Taylor loss change |W * dL/dW|."""
    return first_order(weight, stats.require("grad", "taylor")).abs()  # (out, in)

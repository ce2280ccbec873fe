"""Relative importance and activations, RIA (Zhang et al. 2024, "Plug-and-Play: An Efficient
Post-training Pruning Method for Large Language Models", ICLR 2024).

A weight matters relative to the other weights of its output row and of its input column:
``RI_ij = |W_ij| / sum_k |W_ik| + |W_ij| / sum_k |W_kj|``; the activation term multiplies it
by ``||X_j||_2 ** a`` with the paper's ``a = 0.5``, softer than Wanda's ``a = 1``. Compared
within each output row, as the paper does for unstructured and N:M masks. Normalised per
layer, it does not rank weights across layers: global and OWL allocation rank with Wanda.
"""
from torch import Tensor

from .base import LayerStats, register_score

#: the paper's exponent of the input-norm term
RIA_POWER = 0.5


def relative_importance(weight: Tensor) -> Tensor:
    """(out, in) |W| divided by its row's and by its column's L1 norm, summed (empty rows and
    columns count as zero, never NaN)."""
    a = weight.abs()  # (out, in)
    row = a.sum(dim=1, keepdim=True)  # (out, 1)
    col = a.sum(dim=0, keepdim=True)  # (1, in)
    return a / row.clamp_min(1e-30) + a / col.clamp_min(1e-30)


@register_score("ria", needs=("input_norm",), default_group="row", allocation_proxy="wanda",
                paper="Zhang et al. 2024, Plug-and-Play: An Efficient Post-training Pruning Method for Large "
                      "Language Models (RIA)")
def ria(weight: Tensor, stats: LayerStats) -> Tensor:
    """Relative importance times ||X_j|| ** 0.5."""
    norm = stats.require("input_norm", "ria")  # (in,)
    return relative_importance(weight) * norm.to(weight.dtype).pow(RIA_POWER)  # (out, in)

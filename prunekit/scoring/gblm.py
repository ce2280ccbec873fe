"""GBLM-Pruner (Das et al. 2023, "Beyond Size: How Gradients Shape Pruning Decisions in Large
Language Models"): Wanda's ``|W_ij| * ||X_j||_2`` plus a gradient term ``alpha * |W_ij| * G_ij``,
where ``G`` is the L2 norm over calibration samples of the per-sample loss gradients
(``sqrt(sum_n g_n^2)``), with the paper's ``alpha = 100``. Compared within each output row.

The gradient term reads ``grad_l2``: prunekit's one-shot schedule computes it from one
forward and backward of the dense model per calibration window, before any weight changes.
"""
from torch import Tensor

from .base import LayerStats, register_score

#: the paper's weight of the gradient term
GBLM_ALPHA = 100.0


@register_score("gblm", needs=("input_norm", "grad_l2"), default_group="row",
                paper="Das et al. 2023, Beyond Size: How Gradients Shape Pruning Decisions in Large Language "
                      "Models (GBLM)")
def gblm(weight: Tensor, stats: LayerStats) -> Tensor:
    """|W| * (||X_j|| + alpha * G), G: per-sample gradient norm."""
    norm = stats.require("input_norm", "gblm")  # (in,)
    g = stats.require("grad", "gblm").to(weight.dtype).abs()  # (out, in), the L2 norm over samples (>= 0)
    return weight.abs() * (norm.to(weight.dtype) + GBLM_ALPHA * g)  # (out, in)

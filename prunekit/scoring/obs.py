"""Optimal Brain Surgeon saliency w_ij^2 / [H^-1]_jj (Hassibi & Stork 1993), with the layer
Hessian H = X^T X of the reconstruction loss; the mask criterion of SparseGPT (Frantar &
Alistarh 2023). With ``hinv_sqrt_diag`` = sqrt([H^-1]_jj) the saliency is (w / d)^2.

Across layers it is not comparable (each layer's Hessian has its own scale), so global
and OWL allocation rank with Wanda's score instead, as the OWL paper does for SparseGPT.
"""
from torch import Tensor

from .base import LayerStats, register_score


@register_score("obs", needs=("hessian",), default_group="layer", allocation_proxy="wanda",
                paper="Hassibi & Stork 1993, Second Order Derivatives for Network Pruning: Optimal Brain Surgeon (OBS)")
def obs(weight: Tensor, stats: LayerStats) -> Tensor:
    """OBS saliency w^2 / [H^-1]_jj from the Hessian."""
    d = stats.require("hinv_sqrt_diag", "obs")  # (in,)
    return (weight / d.to(weight.dtype)).square()  # (out, in)

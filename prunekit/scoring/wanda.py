"""Wanda score |W_ij| * ||X_j||_2 (Sun et al. 2024, "A Simple and Effective Pruning
Approach for Large Language Models"), compared within each output row."""
from torch import Tensor

from .base import LayerStats, register_score


@register_score("wanda", needs=("input_norm",), default_group="row",
                paper="Sun et al. 2024, A Simple and Effective Pruning Approach for Large Language Models (Wanda)")
def wanda(weight: Tensor, stats: LayerStats) -> Tensor:
    """|W_ij| times input-feature norm ||X_j||, per row."""
    norm = stats.require("input_norm", "wanda")  # (in,)
    return weight.abs() * norm.to(weight.dtype)  # (out, in)

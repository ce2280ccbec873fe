"""Random scores: the control every pruning paper compares against."""
import torch
from torch import Tensor

from .base import LayerStats, register_score


@register_score("random", default_group="layer")
def random(weight: Tensor, stats: LayerStats) -> Tensor:
    # Drawn on the CPU so a seed gives the same mask on every device.
    scores = torch.rand(weight.shape, generator=stats.generator, dtype=torch.float32)
    return scores.to(device=weight.device, dtype=weight.dtype)  # (out, in)

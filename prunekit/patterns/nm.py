"""N:M semi-structured masks (Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks"):
in every row, of each M consecutive input weights, the M-N lowest-scoring are pruned."""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError


def check_nm_shape(in_features: int, m: int, name: str = "layer") -> None:
    if in_features % m:
        raise ConfigError(
            f"{name} has {in_features} input features, not divisible by M={m}; "
            f"choose an M dividing {in_features} or exclude the layer with --ignore"
        )


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep n of every m consecutive weights (2:4).

    Mask (True = prune) keeping the ``n`` highest of every ``m`` along dim 1 of (out, in)."""
    out_f, in_f = scores.shape
    check_nm_shape(in_f, m)
    groups = scores.reshape(out_f, in_f // m, m)  # (out, in/m, m)
    idx = torch.topk(groups, m - n, dim=2, largest=False, sorted=False).indices  # (out, in/m, m-n)
    pruned = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return pruned.view(out_f, in_f)


def is_nm(weight: Tensor, n: int, m: int) -> bool:
    """Whether every group of ``m`` consecutive inputs of every row has at most ``n`` nonzeros."""
    out_f, in_f = weight.shape
    if in_f % m:
        return False
    nonzero = (weight != 0).reshape(out_f, in_f // m, m).sum(dim=2)  # (out, in/m)
    return bool((nonzero <= n).all())

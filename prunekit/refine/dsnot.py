"""DSnoT (Zhang et al. 2024, "Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse
LLMs", ICLR 2024): keep the sparsity, but swap kept and pruned weights of each output row
so that the row's *expected* reconstruction error shrinks, without any gradient.

For row r with dense weights W, current weights V (zero where pruned) and input means mu,
the expected error is ``e_r = sum_j (W_rj - V_rj) mu_j``. Each cycle, in every row that is
still active:

- **grow** the pruned weight j (back to its dense value W_rj; a weight this refinement pruned
  comes back at its earlier, possibly reconstructed, value) that moves e_r towards zero
  (``sign(W_rj mu_j) == sign(e_r)``) most reliably: the largest ``|W_rj mu_j| / var_j``;
- **prune** one kept weight p whose removal leaves the row's error smaller than before the
  swap (``|e_r - W_rj mu_j + V_rp mu_p| < |e_r|``), the one of least Wanda importance
  ``|V_rp| * ||x_p|| / var_p`` (under N:M, from the grown weight's group of M);
- rows stop when ``|e_r|`` has fallen below ``threshold`` times its starting value, when
  no swap lowers it, or after ``cycles``.

A swap regrows one weight and prunes one, so the count (and an N:M pattern) is kept
exactly; with ``cycles=0`` the mask is unchanged. The criteria follow the paper's
reading (sign of the mean error for growing, a variance-weighted Wanda term for pruning);
its exact tie rules and thresholds may differ; the defaults are its hyperparameters (50
cycles, threshold 0.1, variance powers 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import REFINEMENTS, RefineProblem


#: the power of the input variance in the growing and the pruning criterion (the paper's 1)
VAR_POWER = 1.0


@dataclass(frozen=True)
class DSnoTParams:
    """``cycles``: swaps per row at most; ``threshold``: a row stops once its expected error
    is below this fraction of where it started. The input variance enters both criteria with
    the paper's power 1 (:data:`VAR_POWER`)."""

    cycles: int = 50
    threshold: float = 0.1

    def __post_init__(self) -> None:
        if not isinstance(self.cycles, int) or isinstance(self.cycles, bool) or self.cycles < 0:
            raise ConfigError(f"DSnoT cycles must be an integer >= 0, got {self.cycles!r}")
        if not isinstance(self.threshold, (int, float)) or not (0.0 <= self.threshold < 1.0):
            raise ConfigError(f"DSnoT threshold must be in [0, 1) (a fraction of the starting error), "
                              f"got {self.threshold!r}")


def expected_error(dense: Tensor, weight: Tensor, mean: Tensor) -> Tensor:
    """(out,) expected output lost by each row: (W - V) @ mu."""
    return (dense - weight) @ mean  # (out,)


@REFINEMENTS.register("dsnot", params=DSnoTParams,
                      paper="Zhang et al. 2024, Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse "
                            "LLMs (DSnoT)")
def dsnot(problem: RefineProblem) -> tuple[Tensor, Tensor]:
    """Prune-and-regrow swaps that shrink each row's mean error."""
    p = problem.params if problem.params is not None else DSnoTParams()
    dense = problem.dense.float()  # (out, in)
    weight = problem.weight.float().clone()  # (out, in)
    pruned = problem.pruned.clone()  # (out, in) bool
    mean = problem.mean.float()  # (in,)
    var = problem.variance.float().clamp_min(1e-12)  # (in,)
    # a weight comes back at its dense value, or at its reconstructed one if it was kept at first
    regrow = torch.where(pruned, dense, weight)  # (out, in)
    contrib = regrow * mean  # (out, in) what regrowing each weight gives back to the row's output
    grow_scale = var.pow(-VAR_POWER)  # (in,)
    prune_weight = problem.norm.float() * var.pow(-VAR_POWER)  # (in,)
    err = expected_error(dense, weight, mean)  # (out,)
    start = err.abs()
    active = start > 0
    rows = torch.arange(dense.shape[0], device=dense.device)
    nm = problem.spec.kind == "nm"
    cols = torch.arange(dense.shape[1], device=dense.device)
    inf = torch.tensor(float("inf"), device=dense.device)
    for _ in range(p.cycles):
        active &= err.abs() > p.threshold * start
        if not bool(active.any()):
            break
        sign = err.sign()[:, None]  # (out, 1)
        grow = torch.where(pruned & (contrib * sign > 0), (contrib * sign) * grow_scale, -inf)  # (out, in)
        g = grow.argmax(dim=1)  # (out,)
        can_grow = grow[rows, g] > -inf
        after = err - contrib[rows, g]  # (out,) error once g is regrown
        removal = weight * mean  # (out, in) what pruning each kept weight takes from the row's output
        lowers = (after[:, None] + removal).abs() < err.abs()[:, None]  # (out, in)
        candidates = ~pruned & lowers
        candidates[rows, g] = False
        if nm:  # the pruned weight must share the grown one's group of M
            candidates &= (cols[None, :] // problem.spec.m) == (g[:, None] // problem.spec.m)
        importance = torch.where(candidates, weight.abs() * prune_weight, inf)  # (out, in)
        q = importance.argmin(dim=1)  # (out,)
        swap = active & can_grow & (importance[rows, q] < inf)
        if not bool(swap.any()):
            break
        r = rows[swap]
        gr, qr = g[swap], q[swap]
        err[r] = after[r] + removal[r, qr]
        weight[r, gr] = regrow[r, gr]
        weight[r, qr] = 0.0
        pruned[r, gr] = False
        pruned[r, qr] = True
        active &= swap
    return weight.to(problem.weight.dtype), pruned

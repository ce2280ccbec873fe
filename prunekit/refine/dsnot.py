"""DSnoT (Zhang et al. 2024, "Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse
LLMs", ICLR 2024): keep the sparsity, but swap kept and pruned weights of each output row
so that the row's *expected* reconstruction error shrinks, without any gradient.

For row r with dense weights W, current weights V (zero where pruned) and input means mu,
the expected error is ``e_r = sum_j (W_rj - V_rj) mu_j``. Each cycle, in every row that is
still active, one weight pruned at first is regrown and one weight kept at first is pruned:

- **grow** the pruned weight j (back to its dense value) that moves e_r towards zero
  (``sign(W_rj mu_j) == sign(e_r)``) most reliably: the largest ``|W_rj mu_j| / var_j``;
- **prune** the kept weight p of least Wanda importance ``|V_rp| * ||x_p||`` whose removal
  also moves e_r towards zero (under N:M: from the grown weight's group of M, whatever its
  sign, as there are only M - N candidates);
- the swap is made only if the row's error ends smaller and on the side it started on (no
  overshoot); otherwise, or once ``|e_r|`` is below ``threshold`` times its starting value,
  or after ``cycles``, the row stops.

A swap regrows one weight and prunes one, so the count (and an N:M pattern) is kept
exactly; with ``cycles=0`` the mask is unchanged. Kept weights keep their (possibly
reconstructed) values. As in the authors' code, a weight is regrown or pruned at most once
and the variance (power 1) weighs only the growing criterion; unlike it, the threshold is
relative to each row's starting error, not an absolute value in units of the inputs.
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
    growable, prunable = problem.pruned.clone(), ~problem.pruned  # (out, in) each weight moves once at most
    mean = problem.mean.float()  # (in,)
    contrib = dense * mean  # (out, in) what regrowing each pruned weight gives back to the row's output
    grow_scale = problem.variance.float().clamp_min(1e-12).pow(-VAR_POWER)  # (in,)
    wanda = weight.abs() * problem.norm.float()  # (out, in) importance of each kept weight
    err = expected_error(dense, weight, mean)  # (out,)
    start = err.abs()
    active = start > 0
    rows = torch.arange(dense.shape[0], device=dense.device)
    cols = torch.arange(dense.shape[1], device=dense.device)
    nm = problem.spec.kind == "nm"
    inf = torch.tensor(float("inf"), device=dense.device)
    for _ in range(p.cycles):
        active &= err.abs() > p.threshold * start
        if not bool(active.any()):
            break
        sign = err.sign()[:, None]  # (out, 1)
        toward = contrib * sign  # (out, in) > 0 where regrowing moves the error towards zero
        grow = torch.where(growable & (toward > 0), toward * grow_scale, -inf)  # (out, in)
        g = grow.argmax(dim=1)  # (out,)
        can_grow = grow[rows, g] > -inf
        removal = weight * mean  # (out, in) what pruning each kept weight adds to the row's error
        after = (err - contrib[rows, g])[:, None] + removal  # (out, in) the error after each possible swap
        candidates = prunable & (after * sign >= 0) & (after.abs() < err.abs()[:, None])
        if nm:  # the pruned weight must share the grown one's group of M
            candidates &= (cols[None, :] // problem.spec.m) == (g[:, None] // problem.spec.m)
        else:
            candidates &= removal * sign < 0
        importance = torch.where(candidates, wanda, inf)  # (out, in)
        q = importance.argmin(dim=1)  # (out,)
        swap = active & can_grow & (importance[rows, q] < inf)
        if not bool(swap.any()):
            break
        r, gr, qr = rows[swap], g[swap], q[swap]
        err[r] = after[r, qr]
        weight[r, gr] = dense[r, gr]
        weight[r, qr] = 0.0
        pruned[r, gr], pruned[r, qr] = False, True
        growable[r, gr], prunable[r, qr] = False, False
        active &= swap
    return weight.to(problem.weight.dtype), pruned

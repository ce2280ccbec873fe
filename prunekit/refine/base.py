"""What a refinement sees: one layer's dense weight, its pruned weight and mask, its input
statistics, and the pattern the mask must keep."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor

from ..patterns import MaskSpec
from ..registry import Registry


@dataclass(frozen=True)
class RefineProblem:
    """One layer: ``dense`` (out, in) its weights before pruning, ``weight`` (out, in) after
    (pruned entries zero, the rest possibly reconstructed), ``pruned`` (out, in) bool mask,
    ``mean`` / ``variance`` / ``norm`` (in,) float statistics of its input over calibration
    tokens, ``spec`` the mask's pattern (N:M swaps stay inside a group of M), and the method's
    parameters."""

    dense: Tensor
    weight: Tensor
    pruned: Tensor
    mean: Tensor
    variance: Tensor
    norm: Tensor
    spec: MaskSpec
    params: Any = None


RefineFn = Callable[[RefineProblem], "tuple[Tensor, Tensor]"]
#: name -> fn(problem) -> (new weight (out, in), new pruned mask (out, in))
REFINEMENTS: Registry[RefineFn] = Registry("refinement", "refinements")


@REFINEMENTS.register("none")
def keep(problem: RefineProblem) -> tuple[Tensor, Tensor]:
    """The mask as chosen."""
    return problem.weight, problem.pruned

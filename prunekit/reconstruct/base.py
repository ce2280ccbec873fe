"""The reconstruction axis: given a group of layers that read the same input, choose their
masks and repair the remaining weights. ``none`` only masks; ``sparsegpt`` updates weights."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from torch import Tensor

from ..errors import CalibrationError
from ..patterns import MaskSpec
from ..registry import Registry
from ..scoring import LayerStats, Score

if TYPE_CHECKING:
    from ..calibration.stats import InputStats
    from .sparsegpt import SparseGPTParams


@dataclass(frozen=True)
class Segment:
    """Rows ``start:stop`` of a stacked weight belong to one layer, pruned by ``spec``."""

    start: int
    stop: int
    spec: MaskSpec


@dataclass(frozen=True)
class GroupProblem:
    """Layers sharing one input, stacked along rows: ``weight`` is (sum of outs, in), in any
    float dtype (reconstructions compute in float32 and return the weight's own dtype).

    ``inputs``: the running statistics of that input (the Hessian ``X^T X / n`` and its
    cached inverse factor), or None for data-free pruning.
    """

    weight: Tensor
    segments: tuple[Segment, ...]
    score: Score
    stats: LayerStats
    inputs: InputStats | None
    params: SparseGPTParams
    factor: tuple[Tensor, Tensor] | None = None  # computed once per input and shared by its layers

    def inverse_factor(self) -> tuple[Tensor, Tensor]:
        """(U (in, in) upper Cholesky factor of the damped H^-1, dead (in,) bool)."""
        if self.factor is not None:
            return self.factor
        return inverse_factor(self.inputs, self.params.damp, self.score.name)


def inverse_factor(inputs: InputStats | None, damp: float, who: str = "sparsegpt") -> tuple[Tensor, Tensor]:
    """The damped inverse-Hessian factor of an input's statistics (the solver's state stays
    here, not in the statistics)."""
    from .hessian import inverse_cholesky_upper

    if inputs is None or inputs.gram is None:
        raise CalibrationError(f"score {who!r} / sparsegpt need the layer Hessian from calibration data")
    return inverse_cholesky_upper(inputs.hessian, damp)


ReconstructFn = Callable[[GroupProblem], "tuple[Tensor, Tensor]"]
#: name -> fn(problem) -> (new weight (out, in), pruned mask (out, in))
RECONSTRUCTIONS: Registry[ReconstructFn] = Registry("reconstruction")

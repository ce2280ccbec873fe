"""The score axis: pure functions ``(weight (out, in), stats) -> scores (out, in)``.

Higher score = more important; patterns prune the lowest scores.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor

from ..errors import CalibrationError
from ..registry import Registry


@dataclass(frozen=True)
class LayerStats:
    """Per-layer calibration statistics a score may use. Shapes refer to the weight's ``in``.

    ``input_norm``: ``(in,)`` L2 norm of each input feature over all calibration tokens.
    ``hinv_sqrt_diag``: ``(in,)`` square root of the diagonal of the damped inverse Hessian
    ``(X^T X / n + damp I)^-1``; inside SparseGPT's loop, the diagonal of its Cholesky factor.
    ``grad``: ``(out, in)`` gradient of the loss with respect to the weight (summed over
    calibration or training batches).
    ``generator``: seeded generator for random scores.
    """

    input_norm: Tensor | None = None
    hinv_sqrt_diag: Tensor | None = None
    generator: torch.Generator | None = None
    grad: Tensor | None = None

    def require(self, name: str, score: str) -> Tensor:
        value = getattr(self, name)
        if value is None:
            raise CalibrationError(f"score {score!r} needs {name}, which needs calibration data; pass --calib TEXT")
        return value

    def columns(self, i1: int, i2: int) -> LayerStats:
        """Statistics of input columns ``i1:i2`` (used by blockwise reconstruction)."""
        cut = lambda t: None if t is None else t[i1:i2]  # noqa: E731
        grad = None if self.grad is None else self.grad[:, i1:i2]
        return LayerStats(cut(self.input_norm), cut(self.hinv_sqrt_diag), self.generator, grad)

    def permuted(self, perm: Tensor) -> LayerStats:
        """Statistics of the inputs taken in the order ``perm`` (in,) (N:M channel permutation)."""
        take = lambda t: None if t is None else t[perm]  # noqa: E731
        grad = None if self.grad is None else self.grad[:, perm]
        return LayerStats(take(self.input_norm), take(self.hinv_sqrt_diag), self.generator, grad)


ScoreFn = Callable[[Tensor, LayerStats], Tensor]


@dataclass(frozen=True)
class Score:
    """A registered score.

    ``needs``: statistics it reads (``input_norm``, ``hessian`` or ``grad``); empty means data-free.
    ``default_group``: the comparison group its paper uses for unstructured masks.
    ``allocation_proxy``: the score that ranks weights *across* layers for global/OWL
    allocation (itself when elementwise and cheap).
    """

    name: str
    fn: ScoreFn
    needs: frozenset[str]
    default_group: Literal["row", "layer"]
    allocation_proxy: str

    def __call__(self, weight: Tensor, stats: LayerStats) -> Tensor:
        return self.fn(weight, stats)


SCORES: Registry[Score] = Registry("score")


def register_score(
    name: str,
    *,
    needs: tuple[str, ...] = (),
    default_group: Literal["row", "layer"] = "row",
    allocation_proxy: str | None = None,
    paper: str = "",
) -> Callable[[ScoreFn], ScoreFn]:
    """Register ``fn`` as score ``name``; ``paper``: its citation (see :mod:`prunekit.registry`)."""
    def add(fn: ScoreFn) -> ScoreFn:
        SCORES.register(name, paper=paper)(Score(name, fn, frozenset(needs), default_group, allocation_proxy or name))
        return fn

    return add

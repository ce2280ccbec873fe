"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be
Accurately Pruned in One-Shot").

Columns are pruned left to right; when column j loses weights, the error is spread over
the columns not yet processed with the OBS update ``W[:, j:] -= err_j * U[j, j:]``, where
U is the upper Cholesky factor of the dampened inverse Hessian. Updates inside a block of
``blocksize`` columns are applied eagerly, to the rest lazily in one matrix product per
block. Unstructured masks are chosen per block with the score evaluated on the updated
weights (adaptive mask selection); N:M masks every M columns inside the loop.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..errors import ConfigError
from ..patterns import count_for, lowest_overall, lowest_per_row, nm_mask
from ..scoring import LayerStats
from .base import RECONSTRUCTIONS, GroupProblem, Segment


@dataclass(frozen=True)
class SparseGPTParams:
    """SparseGPT's lazy-batch ``blocksize`` and Hessian dampening ``damp`` (a fraction of the
    mean diagonal, also used by the OBS score without reconstruction); paper defaults."""

    blocksize: int = 128
    damp: float = 0.01

    def __post_init__(self) -> None:
        if not isinstance(self.blocksize, int) or not isinstance(self.damp, (int, float)) \
                or self.blocksize < 1 or not (0 < self.damp < 1):
            raise ConfigError(
                f"SparseGPT needs blocksize >= 1 and 0 < damp < 1, got {self.blocksize!r}, {self.damp!r}"
            )


def block_mask(scores: Tensor, segments: tuple[Segment, ...], i1: int, i2: int) -> Tensor:
    """Unstructured mask (out, w) for columns ``i1:i2``. Counts are differences of rounded
    cumulative counts, so each layer ends with exactly the count a one-shot mask prunes."""
    pruned = torch.empty_like(scores, dtype=torch.bool)
    for seg in segments:
        s = scores[seg.start : seg.stop]  # (rows, w)
        a = seg.spec.amount
        if seg.spec.group == "row":
            k = count_for(a, i2) - count_for(a, i1)
            pruned[seg.start : seg.stop] = lowest_per_row(s, k)
        else:
            rows = seg.stop - seg.start
            k = count_for(a, rows * i2) - count_for(a, rows * i1)
            pruned[seg.start : seg.stop] = lowest_overall(s, k)
    return pruned


@RECONSTRUCTIONS.register("sparsegpt", params=SparseGPTParams,
                          paper="Frantar & Alistarh 2023, SparseGPT: Massive Language Models Can Be Accurately "
                                "Pruned in One-Shot (SparseGPT)")
def sparsegpt(problem: GroupProblem) -> tuple[Tensor, Tensor]:
    """Column by column, OBS updates of the rest."""
    spec = problem.segments[0].spec
    nm = spec.kind == "nm"
    upper, dead = problem.inverse_factor()  # (in, in), (in,)
    weight = problem.weight.float().clone()  # (out, in)
    weight[:, dead] = 0.0
    out_f, in_f = weight.shape
    pruned = torch.zeros_like(weight, dtype=torch.bool)
    bs = problem.params.blocksize

    def stats_for(c1: int, c2: int, d: Tensor) -> LayerStats:
        return replace(problem.stats.columns(c1, c2), hinv_sqrt_diag=d)

    for i1 in range(0, in_f, bs):
        i2 = min(i1 + bs, in_f)
        u_blk = upper[i1:i2, i1:i2]  # (w, w)
        d = u_blk.diagonal()  # (w,)
        # Transposed so that column j is a contiguous row in the loop below.
        w_t = weight[:, i1:i2].t().contiguous()  # (w, out)
        err_t = torch.empty_like(w_t)  # (w, out)
        if nm:
            mask_t = torch.zeros_like(w_t, dtype=torch.bool)
            scale_t = torch.zeros_like(w_t)
        else:
            scores = problem.score(w_t.t(), stats_for(i1, i2, d))  # (out, w)
            mask_t = block_mask(scores, problem.segments, i1, i2).t().contiguous()
            scale_t = mask_t / d[:, None]  # (w, out): err = w * mask / d
        for j in range(i2 - i1):
            if nm and j % spec.m == 0:
                j2 = j + spec.m
                scores = problem.score(w_t[j:j2].t(), stats_for(i1 + j, i1 + j2, d[j:j2]))  # (out, m)
                mask_t[j:j2] = nm_mask(scores, spec.n, spec.m).t()
                scale_t[j:j2] = mask_t[j:j2] / d[j:j2, None]
            err = torch.mul(w_t[j], scale_t[j], out=err_t[j])  # (out,)
            w_t[j:].addr_(u_blk[j, j:], err, alpha=-1.0)
        w_t.masked_fill_(mask_t, 0.0)
        weight[:, i1:i2] = w_t.t()
        pruned[:, i1:i2] = mask_t.t()
        if i2 < in_f:
            weight[:, i2:].addmm_(err_t.t(), upper[i1:i2, i2:], alpha=-1.0)
    return weight.to(problem.weight.dtype), pruned

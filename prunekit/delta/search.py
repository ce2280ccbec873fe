"""Choosing DAREx-q's rescaling on data (Deng et al. 2025, DARE the Extreme: the q tuned on
a validation set, their DAREx-q with validation).

At a high drop rate DARE's factor 1/(1-p) amplifies the survivors so much that the pruned
fine-tune drifts from the original; DAREx-q rescales by 1/q with 1-p <= q <= 1 instead. One
global q is chosen by evaluating the pruned model on held-out data for a grid of q values;
the random mask is the same for every q (same seed), so only the factor varies.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

from torch import Tensor

from .ops import DeltaParams
from .stream import DeltaConfig, Selection, prune_delta

log = logging.getLogger(__name__)


def q_grid(drop: float, points: int = 6) -> list[float]:
    """``points`` values of q from DARE's 1-p up to 1 (no rescaling), evenly spaced in log q."""
    DeltaParams(drop)
    if points < 2:
        return [1.0 - drop]
    return [(1.0 - drop) ** (1.0 - i / (points - 1)) for i in range(points)]


def choose_q(base: Mapping[str, Tensor], finetuned: Mapping[str, Tensor], drop: float,
             evaluate: Callable[[dict[str, Tensor]], float], *, grid: Sequence[float] | None = None, seed: int = 0,
             tensors: Selection = Selection(), progress: bool = False) -> tuple[float, list[dict[str, Any]]]:
    """The q of ``grid`` (default :func:`q_grid`) whose DAREx-q model scores lowest under
    ``evaluate(state_dict)`` (e.g. perplexity on held-out text), and every ``{q, score}``
    tried. ``base`` and ``finetuned``: state dicts (or anything :func:`prune_delta` reads)."""
    tried = []
    for q in grid or q_grid(drop):
        state = prune_delta(base, finetuned, DeltaConfig("darex", drop, q, seed, tensors), progress=progress).state_dict
        tried.append({"q": q, "score": float(evaluate(state))})
        log.info("darex drop %.3f q %.4f: %.4f", drop, q, tried[-1]["score"])
    best = min(tried, key=lambda t: t["score"])
    return best["q"], tried


__all__ = ["choose_q", "q_grid"]

"""Budget allocation for structural pruning: which number of units of each structure meets a
size budget (parameters or MACs), as pure arithmetic that can be checked by hand.

A structure ``s`` (neurons, heads, layers, width) removes ``k`` units from every group (every
MLP loses ``k`` neurons, every attention ``k`` heads, the stack ``k`` blocks). Within one
family of identical blocks the size it takes away is affine in ``k``: ``a + b*k`` for
``k >= 1`` (``a`` holds what appears once, e.g. the bias FLAP's compensation adds), 0 for
``k = 0``. Two exact plans (smallest and largest count) fix ``a`` and ``b``. Removing
``kL`` of ``L`` blocks removes the same fraction of every per-block structure, so

    size(k) = size0 - cost_layers(kL) - (1 - kL / L) * sum_s cost_s(k_s)

which is exact for identical blocks and an estimate otherwise (width also lives outside the
blocks); the search checks its final choice with an exact plan and tightens if needed.

A *mix* gives each structure a weight in [0, 1]; one scalar ``t`` in [0, 1] moves every
structure along its allowed counts in proportion (``k_s = levels_s[round(t * w_s * last)]``),
so size falls monotonically in ``t`` and the smallest ``t`` that meets the budget is found
by bisection. Every mix is one candidate (Minitron, Muralidharan et al. 2024, searches
depth x width combinations of a fixed size in the same spirit, then ranks them by loss).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Mapping

#: the order structures are removed in: whole blocks first, so units are scored on what stays
ORDER = ("layers", "heads", "neurons", "width")


@dataclass(frozen=True)
class Cost:
    """What removing ``k`` units per group of one structure takes away.

    ``n``: units per group (the denominator of the ratio that removes exactly ``k``);
    ``levels``: the counts allowed (ascending, 0 first; widths kept at a multiple of the
    rounding step); ``params``/``macs``: ``(a, b)`` with ``cost(k) = a + b*k`` for k >= 1.
    """

    structure: str
    n: int
    levels: tuple[int, ...]
    params: tuple[float, float]
    macs: tuple[float, float]

    def removed(self, k: int, metric: str) -> float:
        a, b = self.params if metric == "params" else self.macs
        return 0.0 if k == 0 else a + b * k

    def ratio(self, k: int) -> float:
        """The ratio that removes exactly ``k`` of ``n`` (counts round ``r*n`` half up)."""
        return k / self.n


def levels(n: int, step: int = 1, keep_min: int = 1) -> tuple[int, ...]:
    """Counts ``k`` of ``n`` units a group may lose: ``n - k`` stays a multiple of ``step``
    (when ``step`` divides nothing below ``n``, only 0) and at least ``keep_min`` stay."""
    out = [0] + [k for k in range(1, n) if (n - k) % step == 0 and n - k >= max(keep_min, 1)]
    return tuple(out)


def affine(k1: int, removed1: float, k2: int, removed2: float) -> tuple[float, float]:
    """``(a, b)`` with ``a + b*k1 = removed1`` and ``a + b*k2 = removed2`` (b = 0 if k1 == k2)."""
    if k2 == k1:
        return float(removed1), 0.0
    b = (removed2 - removed1) / (k2 - k1)
    return removed1 - b * k1, b


def estimate(costs: Mapping[str, Cost], counts: Mapping[str, int], size0: float, metric: str) -> float:
    """The model's size (``metric``: params or macs) after removing ``counts`` per group."""
    layers = costs.get("layers")
    kept = 1.0 - (counts.get("layers", 0) / layers.n if layers is not None else 0.0)
    total = size0
    for s, cost in costs.items():
        removed = cost.removed(counts.get(s, 0), metric)
        total -= removed if s == "layers" else kept * removed
    return total


def counts_at(costs: Mapping[str, Cost], weights: Mapping[str, float], t: float) -> dict[str, int]:
    """Counts per structure at position ``t`` in [0, 1] of a mix."""
    out = {}
    for s, cost in costs.items():
        last = len(cost.levels) - 1
        out[s] = cost.levels[min(last, int(round(t * weights.get(s, 0.0) * last)))]
    return out


def solve(costs: Mapping[str, Cost], weights: Mapping[str, float], size0: float, target: float, metric: str,
          grid: int = 4096) -> dict[str, int] | None:
    """The least removal along a mix whose estimated size is at most ``target`` (then topped up
    to the target by :func:`fill`); None when even its end (``t = 1``) is larger."""
    if estimate(costs, counts_at(costs, weights, 1.0), size0, metric) > target:
        return None
    lo, hi = 0, grid  # invariant: size(hi) <= target
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if estimate(costs, counts_at(costs, weights, mid / grid), size0, metric) <= target:
            hi = mid
        else:
            lo = mid
    return fill(costs, counts_at(costs, weights, hi / grid), size0, target, metric)


def fill(costs: Mapping[str, Cost], counts: Mapping[str, int], size0: float, target: float,
         metric: str) -> dict[str, int]:
    """Give units back while the estimate stays within ``target``: each round, the smallest
    one-level step back of any structure that still fits (fine-grained units top up first, so
    the mix keeps its coarse choices), until none fits. A mix's first feasible point can
    undershoot the target by a whole level of its coarsest structure (a block)."""
    out = dict(counts)
    while True:
        options = []
        for s, cost in costs.items():
            i = cost.levels.index(out[s])
            if i == 0:
                continue
            trial = {**out, s: cost.levels[i - 1]}
            size = estimate(costs, trial, size0, metric)
            if size <= target:
                options.append((size, s, trial))
        if not options:
            return out
        out = min(options, key=lambda o: o[0])[2]


def mixes(structures: tuple[str, ...], limit: int) -> list[dict[str, float]]:
    """Up to ``limit`` weightings of ``structures``: all equal first, then each alone, then
    each pair, then uneven ones (weights in {0, 0.5, 1}, the largest 1)."""
    grid = [dict(zip(structures, w)) for w in itertools.product((0.0, 0.5, 1.0), repeat=len(structures))
            if max(w) == 1.0]

    def rank(w: dict[str, float]) -> tuple[int, int]:
        ones = sum(v == 1.0 for v in w.values())
        halves = sum(v == 0.5 for v in w.values())
        everything = ones == len(structures)
        return (0 if everything else 1 + halves, ones if halves == 0 else -ones)

    ordered = sorted(grid, key=rank)
    return ordered[:max(limit, 1)]


def label(weights: Mapping[str, float]) -> str:
    return " ".join(f"{s}={w:g}" for s, w in weights.items())


__all__ = ["ORDER", "Cost", "levels", "affine", "estimate", "counts_at", "solve", "fill", "mixes", "label"]

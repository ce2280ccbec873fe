"""Choosing which examples to keep from their scores.

Higher scores are harder everywhere, so ``mode="hard"`` keeps the highest scores (drops the
easy examples) and ``"easy"`` the lowest. Counts follow prunekit's one rounding rule
(:func:`prunekit.rounding.count`). Ties, frequent in forgetting counts (most examples are
forgotten 0 or 1 times), are broken by a seeded random order rather than by index, so a
dataset stored class by class is not cut class by class.
"""
from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from ..errors import ConfigError, DataError
from ..rounding import count

MODES = ("hard", "easy")


def removed_count(n: int, remove: float | None, keep: float | None) -> int:
    """How many of ``n`` examples are dropped for ``remove`` (in [0, 1)) or ``keep`` (in (0, 1])."""
    if (remove is None) == (keep is None):
        raise ConfigError("give exactly one of remove= (the fraction of examples dropped, in [0, 1)) and keep= "
                          f"(the fraction kept, in (0, 1]); got remove={remove}, keep={keep}")
    if remove is not None:
        if isinstance(remove, bool) or not isinstance(remove, Real) or not 0.0 <= remove < 1.0:
            raise ConfigError(f"remove {remove} is outside [0, 1): it is the fraction of the training set dropped "
                              "(remove=0.3 drops 30%); to keep everything use remove=0")
        return count(remove, n)
    if isinstance(keep, bool) or not isinstance(keep, Real) or not 0.0 < keep <= 1.0:
        raise ConfigError(f"keep {keep} is outside (0, 1]: it is the fraction of the training set kept "
                          "(keep=0.7 keeps 70%); to keep everything use keep=1")
    return n - count(keep, n)


def ranking(scores: Tensor, mode: str, seed: int = 0) -> Tensor:
    """All indices, the ones to keep first: by score (descending for ``"hard"``), ties in a
    random order drawn from ``seed``. (N,) -> (N,) int64"""
    perm = torch.randperm(scores.numel(), generator=torch.Generator().manual_seed(seed))  # (N,)
    order = torch.sort(scores[perm], descending=mode == "hard", stable=True).indices
    return perm[order]


def balanced_counts(sizes: list[int], total: int) -> list[int]:
    """Split ``total`` removals over classes of ``sizes`` in proportion, by largest remainder:
    exact in total, each class within one example of its share."""
    n = sum(sizes)
    shares = [total * s / n for s in sizes]
    out = [math.floor(q + 1e-9) for q in shares]
    by_remainder = sorted(range(len(sizes)), key=lambda c: (-(shares[c] - out[c]), c))
    for c in by_remainder[: total - sum(out)]:
        out[c] += 1
    return out


def select(scores: Tensor, *, remove: float | None = None, keep: float | None = None, mode: str = "hard",
           labels: Tensor | None = None, class_balanced: bool = False, seed: int = 0) -> Tensor:
    """Indices (sorted, int64, on the CPU) of the examples kept, for ``torch.utils.data.Subset``.

    ``scores``: (N,), higher = harder (:func:`prunekit.data.score`). ``remove`` / ``keep``:
    the fraction dropped / kept (give one). ``mode``: ``"hard"`` keeps the highest scores,
    ``"easy"`` the lowest. ``class_balanced`` (needs ``labels`` (N,)): every class loses the
    same fraction (the total is exact, each class within one example of its share) instead
    of one global cut. ``seed``: the order among equal scores.
    """
    if mode not in MODES:
        raise ConfigError(f"mode {mode!r}: use 'hard' (keep the highest scores) or 'easy' (keep the lowest)")
    scores = scores.detach().reshape(-1).float().cpu()  # (N,)
    n = scores.numel()
    if n == 0:
        raise DataError("no scores to select from (an empty dataset)")
    if torch.isnan(scores).any():
        bad = torch.nonzero(torch.isnan(scores)).reshape(-1)[:5].tolist()
        raise DataError(f"scores are NaN at examples {bad}: score them again (a diverged training run?) or drop them")
    total = removed_count(n, remove, keep)
    if not class_balanced:
        return torch.sort(ranking(scores, mode, seed)[: n - total]).values
    if labels is None or labels.numel() != n:
        raise ConfigError(f"class_balanced=True needs labels=, one class per score ({n}); got "
                          f"{'none' if labels is None else labels.numel()} "
                          "(prunekit.data.labels_of(dataset) gives them)")
    labels = labels.reshape(-1).cpu()
    classes = torch.unique(labels)
    members = [torch.nonzero(labels == c).reshape(-1) for c in classes]
    kept = []
    for idx, dropped in zip(members, balanced_counts([m.numel() for m in members], total)):
        kept.append(idx[ranking(scores[idx], mode, seed)[: idx.numel() - dropped]])
    return torch.sort(torch.cat(kept)).values


def subset(dataset: Dataset, indices: Tensor) -> Subset:
    """The pruned dataset: a ``torch.utils.data.Subset`` over the kept indices."""
    return Subset(dataset, indices.tolist())


__all__ = ["balanced_counts", "ranking", "removed_count", "select", "subset"]

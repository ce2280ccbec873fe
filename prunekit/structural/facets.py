"""Facets: integer labels that say which prunable unit each element of a tensor belongs to.

A traced tensor carries a list of *facets*. A facet is an int64 tensor broadcastable to the
tensor's shape (size 1 along dims where it is constant): entry ``i`` is the id of the unit
that element ``i`` belongs to, ``-1`` for none. A Linear weight ``(out, in)`` has two facets,
``(out, 1)`` and ``(1, in)``; the activation it produces has one facet varying along its
last dim. Shape-moving ops (view, transpose, cat, getitem...) move facets exactly as they
move data, by running the same op on the materialised id tensor; ops that combine elements
(add, matmul, linear...) *couple* ids, recorded as edges of a union-find over all ids.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

NONE = -1


def varying(f: Tensor) -> tuple[int, ...]:
    """The dims along which facet ``f`` is not constant (its size there is > 1)."""
    return tuple(d for d in range(f.ndim) if f.shape[d] > 1)


def compress(f: Tensor) -> Tensor | None:
    """Shrink ``f`` to size 1 along every dim where it is constant; None when all ``-1``."""
    if f.numel() == 0 or int(f.max()) < 0:
        return None
    for d in range(f.ndim):
        if f.shape[d] > 1 and bool((f == f.narrow(d, 0, 1)).all()):
            f = f.narrow(d, 0, 1)
    return f.contiguous()


def full(f: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Materialise facet ``f`` to the tensor's full ``shape`` (left-padding missing dims)."""
    while f.ndim < len(shape):
        f = f.unsqueeze(0)
    return f.expand(tuple(shape)).contiguous()


def fresh_like(shape: tuple[int, ...], dim: int, start: int) -> Tensor:
    """A facet of ``shape[dim]`` new ids ``start, start+1, ...`` varying along ``dim`` only."""
    view = [1] * len(shape)
    view[dim] = shape[dim]
    return torch.arange(start, start + shape[dim], dtype=torch.int64).view(view)


@dataclass
class UnionFind:
    """Edges between ids, resolved into connected components at the end (vectorised)."""

    size: int = 0
    edges: list[np.ndarray] = field(default_factory=list)  # each (k, 2)
    kinds: list[str] = field(default_factory=list)

    def new(self, n: int) -> int:
        start = self.size
        self.size += n
        return start

    def couple(self, a: Tensor, b: Tensor, kind: str = "") -> None:
        """Couple ``a[i]`` with ``b[i]`` for every position where both are labelled."""
        a, b = torch.broadcast_tensors(a, b)
        keep = (a >= 0) & (b >= 0) & (a != b)
        if bool(keep.any()):
            key = np.unique((a[keep].numpy() << 32) | b[keep].numpy())  # dedupe as one int64 each
            self.edges.append(np.stack([key >> 32, key & 0xFFFFFFFF], 1))
            self.kinds.append(kind)

    def couple_all(self, ids: Tensor, kind: str = "") -> None:
        """Couple every labelled id in ``ids`` with each other."""
        flat = torch.unique(ids[ids >= 0])
        if flat.numel() > 1:
            self.couple(flat[:1].expand(flat.numel() - 1), flat[1:], kind)

    def roots(self, skip: frozenset[str] = frozenset()) -> np.ndarray:
        """Component label (the smallest member id) of every id, ignoring edges of kinds ``skip``."""
        labels = np.arange(self.size, dtype=np.int64)
        chosen = [e for e, k in zip(self.edges, self.kinds) if k not in skip]
        if not chosen:
            return labels
        edges = np.concatenate(chosen)
        a, b = edges[:, 0], edges[:, 1]
        while True:
            low = np.minimum(labels[a], labels[b])
            before = labels.copy()
            np.minimum.at(labels, a, low)
            np.minimum.at(labels, b, low)
            labels = labels[labels]  # pointer jumping
            if np.array_equal(labels, before):
                return labels

"""Which target layers of a block share one input, and in what order the block runs them.

Layers fed the very same tensor (q/k/v, gate/up) share one :class:`InputStats`, so each
statistic (and SparseGPT's inverse-Hessian factor) is computed once per distinct input.
Groups and order are learned from the first batch that runs the block; a layer first seen in
a later batch (an MoE expert that batch 0 did not route to) gets a group of its own, placed
after the nearest layer before it in module order. Sharing is checked in every batch: a
layer that got its group's input in one batch and another tensor in the next raises, since
its statistics would be wrong.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

from torch import Tensor

from ..errors import UnsupportedModelError


@dataclass
class InputGroups:
    """Groups of layers sharing an input (``leader -> members``, leader first) and their order."""

    registered: list[str]
    where: str
    members: dict[str, list[str]] = field(default_factory=dict)
    leader: dict[str, str] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)  # leaders, in execution order
    _fed: dict[tuple[str, int], weakref.ref] = field(default_factory=dict)  # (leader, batch) -> its input

    def rank(self, leader: str) -> int:
        return self.order.index(leader)

    def _place(self, name: str) -> None:
        """Insert a late leader after the last ordered leader that precedes it in module order."""
        pos = self.registered.index(name) if name in self.registered else len(self.registered)
        before = {n for n in self.registered[:pos]}
        at = 0
        for i, leader in enumerate(self.order):
            if any(m in before for m in self.members[leader]):
                at = i + 1
        self.order.insert(at, name)

    def _new(self, name: str) -> str:
        self.members[name] = [name]
        self.leader[name] = name
        return name

    def arrive(self, name: str, x: Tensor, batch: int, defining: bool) -> tuple[str, bool]:
        """Record that ``name`` received ``x`` in ``batch``. Returns ``(leader, is_leader)``;
        ``defining``: this batch may still form groups (the first batch to run the block)."""
        leader = self.leader.get(name)
        if leader is None:
            if defining:
                leader = next((lead for (lead, b), ref in self._fed.items() if b == batch and ref() is x), None)
            if leader is None:
                leader = self._new(name)
                if defining:
                    self.order.append(name)
                else:
                    self._place(name)
            else:
                self.members[leader].append(name)
                self.leader[name] = leader
                return leader, False
        if name == leader:
            self._fed[(leader, batch)] = weakref.ref(x)
            return leader, True
        fed = self._fed.get((leader, batch))
        if fed is None or fed() is not x:
            raise UnsupportedModelError(
                f"in {self.where}, {name} read the same input as {leader} in the first batch but not in batch "
                f"{batch}: the block's data flow depends on the data; use --sequential block")
        return leader, False

    def end_batch(self, batch: int) -> None:
        for key in [k for k in self._fed if k[1] == batch]:
            del self._fed[key]

"""Single-pass, layer-by-layer pruning of one block over all calibration batches ("true
sequential", as in SparseGPT): every target layer is pruned from the statistics of all the
inputs that reach it, each produced by the already-pruned layers before it, and each batch
runs the block once.

Each batch's forward runs in its own *greenlet* (a coroutine on the one OS thread, so no
locks, no per-thread allocator arenas, and Ctrl-C lands in whatever is computing). A batch
runs until its next target layer and hands control back to a plain scheduler loop, which
releases the earliest layer (in the block's order, see :mod:`.groups`) at which any batch is
paused: it prunes that layer's group from the inputs of the batches paused there, then lets
exactly those batches continue. A batch that never reaches a layer (tokens routed to other
experts, a skipped branch) does not delay it: the layer is released once every batch is
paused at or past it, and its statistics come from exactly the tokens that reached it.
Every step either moves one batch strictly forward or finishes it, so the loop ends; a
batch arriving at a layer that was already released (data-dependent order) is an error,
never a wait.

Memory: what every batch holds at its current layer (its live activations) plus one batch's
temporaries; ``--sequential block`` trades a second pass for less.
"""
from __future__ import annotations

from typing import Callable

import greenlet
from torch import Tensor

from ..errors import UnsupportedModelError
from ..targets import Target
from .groups import InputGroups
from .stats import InputStats
from .watch import unwatch, watch

#: visit(names of layers sharing one input, that input's statistics)
GroupVisitor = Callable[[list[str], InputStats], None]
_DONE = object()


def new_stats(x: Tensor, gram: bool, moments: bool) -> InputStats:
    return InputStats(x.shape[-1], gram=gram, moments=moments, device=x.device)


class Lockstep:
    """Run every batch's ``step`` (one forward) once, pruning each group of target layers
    (through ``visit``) just before it first runs, from the inputs all batches bring to it."""

    def __init__(self, targets: dict[str, Target], groups: InputGroups, visit: GroupVisitor, *,
                 gram: bool, where: str, moments: bool = False) -> None:
        self.targets, self.groups, self.visit, self.gram, self.where = targets, groups, visit, gram, where
        self.moments = moments
        self.released: set[str] = set()
        self._pending: dict[str, InputStats] = {}
        self._window: dict[greenlet.greenlet, int] = {}
        self._main: greenlet.greenlet | None = None

    def _arrive(self, name: str, x: Tensor) -> None:
        b = self._window.get(greenlet.getcurrent())
        if b is None:  # not inside one of our batches: nothing to wait for
            return
        leader, is_leader = self.groups.arrive(name, x, b, defining=False)
        if leader in self.released:
            if is_leader:
                raise UnsupportedModelError(
                    f"batch {b} of {self.where} reached {name} after it was pruned from the other batches: "
                    "this block runs its layers in a data-dependent order; use --sequential block")
            return
        if not is_leader:
            return  # its leader paused this batch already; the group is released together
        stats = self._pending.get(leader)
        if stats is None:
            stats = self._pending[leader] = new_stats(x, self.gram, self.moments)
        stats.add(x)
        assert self._main is not None
        self._main.switch(leader)

    def _work(self, b: int, step: Callable[[], None]) -> object:
        step()
        self.groups.end_batch(b)
        return _DONE

    def run(self, steps: list[Callable[[], None]]) -> list[str]:
        """Run ``steps`` (one per batch); returns the target layers no batch reached (unpruned)."""
        self._main = greenlet.getcurrent()
        workers = {b: greenlet.greenlet(lambda b=b, s=s: self._work(b, s), parent=self._main)
                   for b, s in enumerate(steps)}
        for b, g in workers.items():
            self._window[g] = b
        handles = watch(self.targets, self._arrive)
        try:
            state = {b: g.switch() for b, g in workers.items()}
            while True:
                paused = {b: s for b, s in state.items() if s is not _DONE}
                if not paused:
                    break
                leader = min(set(paused.values()), key=self.groups.rank)
                stats = self._pending.pop(leader)
                names = self.groups.members[leader]
                stats.check_finite(f"{names[0]} (block {self.where})")
                self.visit(list(names), stats)
                self.released.add(leader)
                del stats
                for b in [b for b, s in paused.items() if s == leader]:
                    state[b] = workers[b].switch()
        finally:
            unwatch(handles)
            for g in workers.values():
                if not g.dead:
                    g.throw(greenlet.GreenletExit)  # unwind a paused forward
            self._window.clear()
            self._pending.clear()
        reached = {n for lead in self.released for n in self.groups.members[lead]}
        return [n for n in self.targets if n not in reached]


def probe(step: Callable[[], None], targets: dict[str, Target], groups: InputGroups) -> None:
    """Run one batch's forward (through the unmodified block) to learn its groups and order;
    the step must not keep the output."""
    handles = watch(targets, lambda name, x: groups.arrive(name, x, -1, defining=True))
    try:
        step()
    finally:
        unwatch(handles)
        groups.end_batch(-1)

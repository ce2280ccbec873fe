"""Single-pass, layer-by-layer pruning of one block over batched calibration data.

Every target layer must be pruned from the statistics of *all* calibration tokens before any
batch runs it, yet running all batches as one tensor costs memory and (on CPU) speed. So each
batch's forward runs in its own thread, and the threads take turns holding a baton: a thread
runs until the next target layer, leaves its input there, and hands the baton on. When the
last batch arrives, the layer is pruned from all inputs, and the baton returns to the first.
Only one thread computes at a time, so activation memory is one batch's temporaries plus the
tensors each batch holds at the layer boundary, and each block runs once.
"""
from __future__ import annotations

import threading
from typing import Callable

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModelError
from .capture import BlockCall
from .stats import InputStats

#: visit(layer names sharing one input, that input's statistics)
GroupVisitor = Callable[[list[str], InputStats], None]


class _Abort(BaseException):
    """Unwinds the other threads' forwards when one of them failed."""


class Lockstep:
    """Run ``block`` on every batch once, pruning each target layer (through ``visit``) just
    before it first runs, from the inputs all batches bring to it."""

    def __init__(self, block: nn.Module, calls: list[BlockCall], layers: dict[str, nn.Module], *,
                 hessian: bool, visit: GroupVisitor, where: str) -> None:
        self.block, self.calls, self.layers = block, calls, layers
        self.hessian, self.visit, self.where = hessian, visit, where
        self.seen: set[str] = set()
        self._cv = threading.Condition()
        self._local = threading.local()
        self._turn = 0
        self._error: BaseException | None = None
        self._arrived: list[Tensor] = []
        self._expected = ""
        self._last: tuple[list[Tensor], InputStats] | None = None

    # -- the baton ---------------------------------------------------------------------
    def _wait_turn(self, t: int) -> None:
        self._cv.wait_for(lambda: self._turn == t or self._error is not None)
        if self._error is not None:
            raise _Abort

    def _pass(self, t: int) -> None:
        self._turn = (t + 1) % len(self.calls)
        self._cv.notify_all()

    def _fail(self, exc: BaseException) -> None:
        with self._cv:
            if self._error is None:
                self._error = exc
            self._cv.notify_all()

    # -- the barrier at each target layer -------------------------------------------------
    def _stats(self, name: str, inputs: list[Tensor]) -> InputStats:
        last = self._last
        if last is not None and len(last[0]) == len(inputs) and all(a is b for a, b in zip(last[0], inputs)):
            return last[1]  # same tensors as the previous layer (q/k/v, gate/up): reuse
        self._last = None
        stats = InputStats(inputs[0].shape[-1], self.hessian, inputs[0].device)
        for x in inputs:
            stats.add(x.detach())
        stats.check_finite(f"{name} (block {self.where})")
        self._last = (inputs, stats)
        return stats

    def _hook(self, name: str):
        def pre_hook(module: nn.Module, args: tuple) -> None:
            t = self._local.index
            with self._cv:
                if t == 0:
                    self._expected, self._arrived = name, []
                elif name != self._expected:
                    raise UnsupportedModelError(
                        f"batches of block {self.where} reached {name} and {self._expected} in different orders; "
                        "run with --sequential block"
                    )
                self._arrived.append(args[0])
                if t == len(self.calls) - 1:
                    if name not in self.seen:
                        self.visit([name], self._stats(name, self._arrived))
                        self.seen.add(name)
                    self._arrived = []
                self._pass(t)
                self._wait_turn(t)

        return pre_hook

    def _worker(self, t: int, hidden: Tensor, outs: list[Tensor | None]) -> None:
        self._local.index = t
        try:
            with self._cv:
                self._wait_turn(t)
            with torch.no_grad():  # grad mode is per thread
                outs[t] = self.calls[t].run(self.block, hidden)
            with self._cv:
                self._pass(t)
        except _Abort:
            pass
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            self._fail(exc)

    def run(self, hiddens: list[Tensor]) -> list[Tensor]:
        """Block outputs for each batch of ``hiddens``; target layers are pruned on the way."""
        outs: list[Tensor | None] = [None] * len(hiddens)
        handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.layers.items()]
        try:
            threads = [threading.Thread(target=self._worker, args=(t, h, outs), daemon=True)
                       for t, h in enumerate(hiddens)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
        finally:
            for handle in handles:
                handle.remove()
            self._arrived, self._last = [], None
        if self._error is not None:
            raise self._error
        return outs  # type: ignore[return-value]

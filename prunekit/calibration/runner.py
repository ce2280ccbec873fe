"""The sequential layer-by-layer runner (as in SparseGPT and Wanda): capture the first
block's inputs, then for each block gather its layers' input statistics, let a visitor
prune them, and feed the pruned block's outputs to the next block.

Two ways to run a block that is being pruned:

* **single pass** (all calibration windows in one batch, the default): each layer is pruned
  in a forward pre-hook just before it runs, so every layer's statistics come from the
  outputs of the already-pruned layers before it in the block (SparseGPT's "true
  sequential" order) and the block runs once. Activation memory: all windows at once.
* **two passes** (``batch_size`` < ``nsamples``): statistics from the block as it was,
  pruning, then a second pass for the outputs. Activation memory: one batch.

Memory is one block's statistics plus one (nsamples, seq, hidden) buffer overwritten in place.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import CalibrationError, UnsupportedModelError
from .capture import BlockCall, capture_block_inputs
from .stats import InputStats, StatsCollector, _StopBlock

log = logging.getLogger(__name__)

#: visit(layer names sharing one input, that input's statistics)
GroupVisitor = Callable[[list[str], InputStats], None]


def _check_finite(x: Tensor, where: str) -> None:
    if not torch.isfinite(x).all():
        raise CalibrationError(
            f"NaN/Inf activations at {where}: the model overflows on the calibration data; "
            "load it in float32 (the default) or check its weights"
        )


def _check_all_seen(layers: dict[str, nn.Module], seen: set[str], where: str) -> None:
    missing = set(layers) - seen
    if missing:
        raise UnsupportedModelError(
            f"layers {sorted(missing)} were never called in the forward pass of {where}; exclude them with --ignore"
        )


class InlinePruner:
    """Forward pre-hooks that gather a layer's input statistics and visit (prune) it before it
    runs. Layers fed the same tensor object share one ``InputStats`` (and its inverse factor)."""

    def __init__(self, layers: dict[str, nn.Module], hessian: bool, visit: GroupVisitor, where: str) -> None:
        self.layers, self.hessian, self.visit, self.where = layers, hessian, visit, where
        self.seen: set[str] = set()
        self._last: tuple[Tensor, InputStats] | None = None  # layers sharing an input run back to back

    def _hook(self, name: str):
        def pre_hook(module: nn.Module, args: tuple) -> None:
            if name in self.seen:
                return
            x = args[0]
            if self._last is not None and self._last[0] is x:
                stats = self._last[1]
            else:
                self._last = None  # release the previous input before gathering the next
                stats = InputStats(x.shape[-1], self.hessian, x.device)
                stats.add(x.detach())
                stats.check_finite(f"{name} (block {self.where})")
                self._last = (x, stats)
            self.visit([name], stats)
            self.seen.add(name)

        return pre_hook

    def __enter__(self) -> InlinePruner:
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.layers.items()]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._last = None


@torch.no_grad()
def _forward(block: nn.Module, hiddens: list[Tensor], calls: list[BlockCall], *, keep: bool,
             collector: StatsCollector | None, where: str) -> None:
    for b, (hidden, call) in enumerate(zip(hiddens, calls)):
        try:
            out = call.run(block, hidden)
        except _StopBlock:
            out = None
        if collector is not None:
            collector.end_batch()
        if keep:
            assert out is not None
            _check_finite(out, f"the output of {where}")
            hiddens[b] = out


@torch.no_grad()
def run_sequential(
    model: nn.Module,
    blocks: nn.ModuleList,
    blocks_name: str,
    ids: Tensor,
    layers: list[dict[str, nn.Module]],
    visit: GroupVisitor,
    *,
    hessian: bool,
    modifies: bool,
    batch_size: int | None = None,
    progress: bool = True,
    desc: str = "blocks",
) -> None:
    """Visit every target layer of every block with the statistics of its input.

    ``ids``: (nsamples, seq) token ids. ``layers[i]``: block i's target layers by name.
    ``hessian``: gather X^T X (else per-feature squares only). ``modifies``: the visitor
    changes weights, so block outputs must come from the pruned block. ``batch_size``:
    windows per forward; None runs all at once (single pass when ``modifies``).
    """
    batches = ids.split(batch_size or ids.shape[0])
    single_pass = modifies and len(batches) == 1
    was_training = model.training
    model.eval()
    try:
        hiddens, calls = capture_block_inputs(model, blocks, batches)
        for h in hiddens:
            _check_finite(h, "the input of the first block")
        for i, block in enumerate(tqdm(blocks, desc=desc, disable=not progress, leave=False)):
            where = f"{blocks_name}.{i}"
            if not layers[i]:
                _forward(block, hiddens, calls[i], keep=True, collector=None, where=where)
            elif single_pass:
                with InlinePruner(layers[i], hessian, visit, where) as pruner:
                    _forward(block, hiddens, calls[i], keep=True, collector=None, where=where)
                _check_all_seen(layers[i], pruner.seen, where)
            else:
                with StatsCollector(layers[i], hessian=hessian, stop_early=modifies) as collector:
                    _forward(block, hiddens, calls[i], keep=not modifies, collector=collector, where=where)
                _check_all_seen(layers[i], {n for g in collector.groups for n in g.names}, where)
                for group in collector.groups:
                    group.stats.check_finite(f"{group.names[0]} (block {where})")
                    visit(group.names, group.stats)
                if modifies:
                    _forward(block, hiddens, calls[i], keep=True, collector=None, where=where)
    finally:
        model.train(was_training)

"""The sequential layer-by-layer runner (as in SparseGPT and Wanda): capture the first
block's inputs, then for each block gather its layers' input statistics, let a visitor
prune them, and feed the pruned block's outputs to the next block.

Two orders for a block that is being pruned:

* ``sequential="layer"`` (default): one pass; each layer is pruned just before it runs, from
  the inputs that the already-pruned layers before it produce (SparseGPT's "true
  sequential" order), with batches in lockstep (see ``lockstep.py``).
* ``sequential="block"``: statistics from the block as it was, pruning, then a second pass
  for the outputs (the order of the Wanda and SparseGPT reference code).

Memory: the model, one block's statistics, one batch's temporaries, and the
(nsamples, seq, hidden) hidden states, replaced in place block by block.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import CalibrationError, UnsupportedModelError
from .capture import BlockCall, capture_block_inputs
from .lockstep import GroupVisitor, Lockstep
from .stats import StatsCollector, _StopBlock


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
    sequential: str = "layer",
    progress: bool = True,
    desc: str = "blocks",
) -> None:
    """Visit every target layer of every block with the statistics of its input.

    ``ids``: (nsamples, seq) token ids. ``layers[i]``: block i's target layers by name.
    ``hessian``: gather X^T X (else per-feature squares only). ``modifies``: the visitor
    changes weights, so block outputs must come from the pruned block. ``batch_size``:
    windows per forward (None: all at once). ``sequential``: "layer" or "block" (above).
    """
    batches = ids.split(batch_size or ids.shape[0])
    single_pass = modifies and sequential == "layer"
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
                lockstep = Lockstep(block, calls[i], layers[i], hessian=hessian, visit=visit, where=where)
                hiddens[:] = lockstep.run(hiddens)
                _check_all_seen(layers[i], lockstep.seen, where)
                if i == len(blocks) - 1:  # earlier outputs are checked by the next block's statistics
                    for h in hiddens:
                        _check_finite(h, f"the output of {where}")
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

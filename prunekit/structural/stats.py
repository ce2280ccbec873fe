"""Calibration statistics for structural scores, gathered through the one sequential runner:
the float64 input moments of every Linear/Conv that consumes pruned units (FLAP's
fluctuation, structured Wanda's norms, bias compensation), block by block, so structural
scoring scales like one-shot pruning.

Consumers outside the blocks (an LM head reading the hidden width, a ViT's classifier) are
seen by one more pass that replays the last block's outputs into the model's epilogue; it
runs only when a chosen group has such a consumer. A model without a list of blocks, or
whose blocks cannot be replayed, runs as one block.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from ..calibration import CalibrationData, InputStats, RunOptions, run_sequential
from ..calibration.runner import stream
from ..calibration.groups import InputGroups
from ..errors import UnsupportedModelError
from ..models.decoder import block_list
from ..targets import Target, as_target

log = logging.getLogger(__name__)


def is_consumer(module: nn.Module) -> bool:
    return (isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or type(module).__name__ == "Conv1D") \
        and isinstance(getattr(module, "weight", None), Tensor)


def _consumers(root: nn.Module, prefix: str, wanted: set[str] | None) -> dict[str, Target]:
    out = {}
    for name, m in root.named_modules():
        full = f"{prefix}.{name}" if prefix and name else (name or prefix)
        if is_consumer(m) and (wanted is None or f"{full}.weight" in wanted):
            out[full] = as_target(m, full)
    return out


def input_moments(model: nn.Module, data: CalibrationData, wanted: set[str] | None = None, *,
                  options: RunOptions = RunOptions(progress=False)) -> dict[str, InputStats]:
    """``weight name -> InputStats`` (with moments) of the input of every consumer whose weight
    is in ``wanted`` (None: all)."""
    stats: dict[str, InputStats] = {}

    def visit(names: list[str], s: InputStats) -> None:
        for n in names:
            stats[f"{n}.weight"] = s

    layout = block_list(model)
    if layout is not None:
        name, blocks = layout
        per_block = [_consumers(b, f"{name}.{i}", wanted) for i, b in enumerate(blocks)]
        inside = {t for layer in per_block for t in layer}
        outside = {n: t for n, t in _consumers(model, "", wanted).items() if n not in inside}
        try:
            finals: list[Tensor] = []
            run_sequential(model, data, layout, per_block, visit, moments=True, modifies=False, options=options,
                           keep_final=finals if outside else None)
            if outside:
                _outside(model, data, blocks, finals, outside, visit)
            return stats
        except UnsupportedModelError as exc:
            log.info("running %s as one block (%s)", type(model).__name__, exc)
            stats.clear()
    run_sequential(model, data, None, [_consumers(model, "", wanted)], visit, moments=True, modifies=False,
                   options=options)
    return stats


class _Replay(nn.Module):
    """Stands in for the first block: returns the last block's output for the current batch."""

    def __init__(self, finals: list[Tensor]) -> None:
        super().__init__()
        self.finals, self.batch = finals, 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.finals[self.batch]


@torch.no_grad()
def _outside(model: nn.Module, data: CalibrationData, blocks: nn.ModuleList, finals: list[Tensor],
             targets: dict[str, Target], visit: Any) -> None:
    """Moments of consumers before and after the blocks: one forward per batch in which the
    first block returns the last block's output and the others pass it through."""
    replay = _Replay(finals)

    def passthrough(*args: Any, **kwargs: Any) -> Any:
        return args[0] if args else kwargs["hidden_states"]

    for i, block in enumerate(blocks):
        block.forward = replay.forward if i == 0 else passthrough
    try:
        def step(b: int):
            def run() -> None:
                replay.batch = b
                data.forward(model, data.batches[b])
            return run

        groups = InputGroups(list(targets), type(model).__name__)
        found = stream([step(b) for b in range(len(data))], targets, groups, gram=False, moments=True,
                       stop_early=False)
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)
    for leader, s in found.items():
        visit(list(groups.members[leader]), s)


__all__ = ["input_moments", "is_consumer"]

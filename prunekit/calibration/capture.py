"""Capturing what each block is called with: the first block's hidden states and, for every
block, the other arguments the model computes once (masks, rotary embeddings, positions).
Per block, because models such as Gemma 2/3 give each layer type its own mask and rotary."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ReplayError, UnsupportedModelError
from .data import CalibrationData, move


@dataclass
class BlockCall:
    """How a block was called, minus its hidden states."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    hidden_as_kwarg: bool

    def to(self, device: torch.device) -> BlockCall:
        return BlockCall(move(self.args, device), move(self.kwargs, device), self.hidden_as_kwarg)

    def run(self, block: nn.Module, hidden: Tensor) -> Tensor:
        if self.hidden_as_kwarg:
            out = block(*self.args, hidden_states=hidden, **self.kwargs)
        else:
            out = block(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


class _StopCapture(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList,
                         data: CalibrationData) -> tuple[list[Tensor], list[list[BlockCall]]]:
    """Run the model's prologue on each calibration batch with every block replaced by a
    recorder that passes hidden states through; stop at the last block.

    Returns the first block's inputs, one (batch, seq, hidden) tensor per batch, and
    ``calls[block][batch]``. Costs the embeddings only, not the blocks or the head.
    """
    hiddens: list[Tensor] = []
    calls: list[list[BlockCall]] = [[] for _ in blocks]
    last = len(blocks) - 1

    def recorder(index: int):
        def forward(*args: Any, **kwargs: Any) -> Any:
            hidden_as_kwarg = not args
            if hidden_as_kwarg and "hidden_states" not in kwargs:
                raise ReplayError(
                    f"block {index} was called without hidden states (positional or 'hidden_states='); "
                    "the layer-by-layer runner cannot replay it")
            hidden = kwargs.pop("hidden_states") if hidden_as_kwarg else args[0]
            if index == 0:
                hiddens.append(hidden.detach())
            calls[index].append(BlockCall(tuple(args[1:]), kwargs, hidden_as_kwarg))
            if index == last:
                raise _StopCapture
            return hidden

        return forward

    for i, block in enumerate(blocks):
        block.forward = recorder(i)
    try:
        for batch in data:
            try:
                data.forward(model, batch)
            except _StopCapture:
                pass
            except UnsupportedModelError:
                raise
            except Exception as exc:  # noqa: BLE001 - a model that cannot run with recorded blocks
                raise ReplayError(
                    f"{type(model).__name__} cannot run with its blocks replayed one by one "
                    f"({type(exc).__name__}: {exc})") from exc
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)
    for i, block_calls in enumerate(calls):
        if len(block_calls) != len(data):
            raise ReplayError(
                f"block {i} of {len(blocks)} ran {len(block_calls)} times for {len(data)} batches: "
                "the model does not call its blocks once each in order, which the layer-by-layer runner needs"
            )
    return hiddens, calls

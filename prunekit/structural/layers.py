"""Depth pruning: score whole blocks and remove the least important ones.

Block influence is ``1 - cos(h_in, h_out)`` averaged over calibration tokens: a block that
barely changes its input can go (Men et al., "ShortGPT: Layers in Large Language Models are
More Redundant Than You Expect", 2024).
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..calibration import CalibrationData, Observer, RunOptions, run_sequential
from ..errors import ConfigError, StructureError
from ..models.adapters import adapter_for
from ..models.decoder import find_blocks
from ..registry import Registry
from ..scoring.random import uniform_scores
from .remove import owner_of
from ..rounding import count

log = logging.getLogger(__name__)

#: score(model, calibration data or None, generator, runner options) -> (blocks,)
BlockScore = Callable[[nn.Module, "CalibrationData | None", torch.Generator, RunOptions], Tensor]
LAYER_SCORES: Registry[BlockScore] = Registry("layer score", "layer_scores")


@LAYER_SCORES.register("block_influence",
                       paper="Men et al. 2024, ShortGPT: Layers in Large Language Models are More Redundant Than "
                             "You Expect (ShortGPT)")
def block_influence(model: nn.Module, data: CalibrationData | None, gen: torch.Generator,
                    options: RunOptions) -> Tensor:
    """1 - cos(h_in, h_out): blocks that change least go.

    ``(blocks,)`` mean over tokens of ``1 - cos(h_in, h_out)``, each block's input and output
    seen by the sequential runner."""
    if not data:
        raise ConfigError("block influence needs calibration data (--calib TEXT or data=...)")
    name, blocks = find_blocks(model)
    total = torch.zeros(len(blocks), dtype=torch.float64)
    count = torch.zeros(len(blocks), dtype=torch.float64)

    def batch(i: int, h_in: Tensor, h_out: Tensor) -> None:
        if h_in.shape != h_out.shape:
            raise StructureError(f"block {i} does not map hidden states to hidden states of the same shape")
        a, b = h_in.float().flatten(0, -2), h_out.float().flatten(0, -2)  # (tokens, hidden)
        cos = nn.functional.cosine_similarity(a, b, dim=-1)  # (tokens,)
        total[i] += float((1 - cos).double().sum())
        count[i] += cos.numel()

    run_sequential(model, data, (name, blocks), [{} for _ in blocks], lambda names, stats: None, modifies=False,
                   options=options, observer=Observer(batch=batch))
    return (total / count.clamp_min(1)).float()


@LAYER_SCORES.register("random")
def random_blocks(model: nn.Module, data: CalibrationData | None, gen: torch.Generator,
                  options: RunOptions) -> Tensor:
    """Random block scores: the control."""
    return uniform_scores(len(find_blocks(model)[1]), gen)


def choose_blocks(scores: Tensor, ratio: float) -> list[int]:
    """Indices of the ``count(ratio, n)`` lowest-scoring blocks (:mod:`prunekit.rounding`; one block stays)."""
    n = scores.numel()
    k = count(ratio, n)
    if k >= n:
        raise ConfigError(f"ratio {ratio} would remove all {n} blocks; use a ratio below {(n - 0.5) / n:.3f}")
    return sorted(torch.argsort(scores, stable=True)[:k].tolist())


def remove_blocks(model: nn.Module, drop: list[int]) -> dict[str, Any]:
    """Delete blocks ``drop`` from the model's block list; renumber per-layer indices and
    the config (``num_hidden_layers``, ``layer_types``). Returns the config changes."""
    name, blocks = find_blocks(model)
    adapter = adapter_for(model)
    keep = [b for i, b in enumerate(blocks) if i not in set(drop)]
    setattr(*owner_of(model, name), nn.ModuleList(keep))
    for new_index, block in enumerate(keep):
        for m in block.modules():
            if isinstance(getattr(m, adapter.layer_index, None), int):
                setattr(m, adapter.layer_index, new_index)
    changes: dict[str, Any] = {}
    config = getattr(model, "config", None)
    if config is not None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        for field_ in adapter.sizes["layers"]:
            if isinstance(getattr(text, field_, None), int):
                changes[field_] = len(keep)
                setattr(text, field_, len(keep))
        types = getattr(text, "layer_types", None)
        if isinstance(types, list) and len(types) == len(blocks):
            text.layer_types = [t for i, t in enumerate(types) if i not in set(drop)]
            changes["layer_types"] = text.layer_types
    return changes


class SkipBlock(nn.Module):
    """A block that returns its input unchanged: the masked reference for depth pruning."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.inner = block

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return args[0] if args else kwargs["hidden_states"]


def skip_blocks(model: nn.Module, drop: list[int]) -> None:
    """Replace blocks ``drop`` by :class:`SkipBlock` in place (the masked reference)."""
    _, blocks = find_blocks(model)
    for i in drop:
        blocks[i] = SkipBlock(blocks[i])

"""Choosing candidate layers: supported layer types, names, the ignore list; and the
(out, in) weight view every score and pattern works on."""
from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import Tensor, nn

from .errors import UnsupportedModelError


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 style Conv1D: a Linear with a transposed (in, out) weight.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_supported(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def weight_2d(module: nn.Module) -> Tensor:
    """The layer's weight as an (out, in) view."""
    weight = module.weight.detach()
    return weight.t() if _is_conv1d(module) else weight


@torch.no_grad()
def set_weight_2d(module: nn.Module, weight: Tensor) -> None:
    """Write an (out, in) weight back, keeping the parameter's dtype and device."""
    weight_2d(module).copy_(weight.to(module.weight.dtype))


def _ignored(name: str, ignore: Iterable[str]) -> bool:
    return any(re.search(rx, name) for rx in ignore)


def select_layers(root: nn.Module, prefix: str, ignore: tuple[str, ...]) -> dict[str, nn.Module]:
    """Supported layers under ``root`` by full name, minus ignored ones.

    Raises if ``root`` holds a matrix-shaped parameter outside any supported layer that is
    not ignored: pruning must never silently skip weights it cannot handle.
    """
    layers: dict[str, nn.Module] = {}
    covered: set[int] = set()
    for name, module in root.named_modules():
        full = f"{prefix}.{name}" if name else prefix
        if is_supported(module):
            covered.update(id(p) for p in module.parameters(recurse=False))
            if not _ignored(full, ignore):
                layers[full] = module
    for name, param in root.named_parameters():
        full = f"{prefix}.{name}"
        if param.dim() >= 2 and id(param) not in covered and not _ignored(full, ignore):
            raise UnsupportedModelError(
                f"parameter {full} {tuple(param.shape)} belongs to a layer type prunekit cannot prune "
                f"(supported: nn.Linear, transformers Conv1D); exclude it with --ignore "
                f"'{re.escape(full.rsplit('.', 1)[0])}' to leave it dense"
            )
    return layers

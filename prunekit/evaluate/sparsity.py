"""Sparsity and size report: per-layer zeros, N:M validity, parameter counts."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..models import find_blocks
from ..patterns.permute import PERMS_ATTR, PERMUTATIONS_FILE, is_nm_permuted
from ..targets import select_layers, weight_2d


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, nonzero) over unique parameters (tied weights counted once)."""
    total = nonzero = 0
    for p in model.parameters():  # .parameters() already de-duplicates shared tensors
        total += p.numel()
        nonzero += int(torch.count_nonzero(p))
    return total, nonzero


@torch.no_grad()
def sparsity_report(model: nn.Module, nm: tuple[int, int] | None = None, ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """Per-layer and overall sparsity of the prunable layers inside the model's blocks. With
    ``nm``, each layer's N:M validity, over its permuted input order where it has one
    (``input_permuted``)."""
    perms = model.__dict__.get(PERMS_ATTR) or {}
    blocks_name, blocks = find_blocks(model)
    layers: dict[str, Any] = {}
    zeros = numel = 0
    for i, block in enumerate(blocks):
        for name, module in select_layers(block, f"{blocks_name}.{i}", ignore).items():
            w = weight_2d(module)
            z = int(w.numel() - torch.count_nonzero(w))
            entry: dict[str, Any] = {"shape": list(w.shape), "sparsity": z / w.numel()}
            if nm is not None:
                entry["nm_valid"] = is_nm_permuted(w, *nm, perms.get(name))
            if name in perms:
                entry["input_permuted"] = True
            layers[name] = entry
            zeros += z
            numel += w.numel()
    total, nonzero = count_params(model)
    report: dict[str, Any] = {
        "sparsity": zeros / max(numel, 1),
        "pruned_layers_params": numel,
        "params_total": total,
        "params_nonzero": nonzero,
        "layers": layers,
    }
    if nm is not None:
        report["nm_valid"] = all(e["nm_valid"] for e in layers.values())
    permuted = sum(1 for e in layers.values() if e.get("input_permuted"))
    if permuted:
        report["input_permuted_layers"] = permuted
        report["input_permuted_note"] = (
            f"{permuted} layers hold their N:M groups over permuted inputs (saved in {PERMUTATIONS_FILE}): "
            "a sparse N:M kernel needs x[..., perm] for them, or the permutation folded into the layer "
            "that produces x; dense inference is unchanged")
    return report

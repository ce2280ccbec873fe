"""Physical removal: slice the members of chosen units out of every parameter, then bring
each module's size attributes (``in_features``, ``groups``, head counts...) in line.

The size rules live in :mod:`prunekit.models.sizes`; the same rules run when a pruned model is
reloaded, so a non-uniformly pruned model rebuilds from its recorded parameter shapes.
"""
from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ..errors import StructureError
from ..models.sizes import apply_attributes, snapshot, sync_attributes  # noqa: F401  (re-exported)
from .graph import Member



def drop_plan(units: Iterable[tuple[Member, ...]]) -> dict[tuple[str, int], set[int]]:
    """``(param, dim) -> indices to drop`` for a collection of units (or sub-units)."""
    plan: dict[tuple[str, int], set[int]] = defaultdict(set)
    for unit in units:
        for m in unit:
            plan[(m.param, m.dim)].update(m.index)
    return plan


def owner_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding the dotted ``name`` (a tensor or a child) and the last part."""
    owner, _, attr = name.rpartition(".")
    return (model.get_submodule(owner) if owner else model), attr


def _tensor(model: nn.Module, name: str) -> Tensor:
    module, attr = owner_of(model, name)
    return getattr(module, attr)


def remove_units(model: nn.Module, units: Iterable[tuple[Member, ...]]) -> dict[str, dict[str, Any]]:
    """Remove the units in place. Returns the attribute changes ``{module: {attr: value}}``."""
    plan = drop_plan(units)
    before = snapshot(model)
    with torch.no_grad():
        for (name, dim), drop in sorted(plan.items()):
            t = _tensor(model, name)
            keep = torch.tensor(sorted(set(range(t.shape[dim])) - drop), dtype=torch.long, device=t.device)
            if keep.numel() == 0:
                raise StructureError(f"removal would leave {name} with no entries along dim {dim}")
            t.data = t.data.index_select(dim, keep).contiguous()
            if t.grad is not None:
                t.grad = None
    return sync_attributes(model, before)


def mask_units(model: nn.Module, units: Iterable[tuple[Member, ...]]) -> nn.Module:
    """A copy of ``model`` with the units' members zeroed instead of removed (the reference
    the physically pruned model must reproduce)."""
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for (name, dim), drop in drop_plan(units).items():
            t = _tensor(masked, name)
            t.index_fill_(dim, torch.tensor(sorted(drop), dtype=torch.long, device=t.device), 0.0)
    return masked


def masked_units(groups: Iterable[Any], masks: dict[str, Tensor]) -> list[tuple[Member, ...]]:
    """Units whose every member slice inside ``masks`` (True = pruned) is masked."""
    out = []
    for g in groups:
        for unit in getattr(g, "units", g):
            inside = [m for m in unit if m.param in masks]
            if inside and all(bool(masks[m.param].index_select(m.dim, torch.tensor(m.index, device=masks[m.param].device)).all()) for m in inside):
                out.append(unit)
    return out


def remove_masked_units(model: nn.Module, groups: Iterable[Any], masks: dict[str, Tensor]) -> dict[str, dict[str, Any]]:
    """Physically remove the units a training-time mask switched off entirely (structured
    masks from ``channels=True`` with ``units=``). Their consumers' weights are zero, so the
    model's outputs do not change (exactly, except for groups marked ``inexact``)."""
    return remove_units(model, masked_units(groups, masks))

"""Physical removal: slice the members of chosen units out of every parameter, then bring
each module's size attributes (``in_features``, ``groups``, head counts...) in line.

The same attribute rules run when a pruned model is reloaded (:mod:`prunekit.export.structure`),
so a non-uniformly pruned model rebuilds from its recorded parameter shapes.
"""
from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ..errors import StructureError
from .graph import Member

HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads", "heads")
KV_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
Q_NAMES = ("q_proj", "query", "q", "q_lin", "to_q")
K_NAMES = ("k_proj", "key", "k", "k_lin", "to_k")
FUSED_NAMES = ("c_attn", "qkv", "query_key_value", "Wqkv", "to_qkv")


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


def snapshot(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Size attributes of every module, to compare against after slicing."""
    out: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            out[name] = {"out_channels": m.out_channels, "groups": m.groups, "in_channels": m.in_channels}
    return out


def sync_attributes(model: nn.Module, before: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Set size attributes from parameter shapes; return what changed."""
    before = before or snapshot(model)
    changes: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        new = _sizes(m, before.get(name))
        diff = {k: v for k, v in new.items() if getattr(m, k, None) != v}
        for k, v in diff.items():
            setattr(m, k, v)
        if diff:
            changes[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in diff.items()}
    return changes


def apply_attributes(model: nn.Module, changes: dict[str, dict[str, Any]]) -> None:
    """Re-apply recorded attribute changes (used when reloading a pruned model)."""
    for name, attrs in changes.items():
        module = model.get_submodule(name) if name else model
        for k, v in attrs.items():
            setattr(module, k, tuple(v) if isinstance(getattr(module, k, None), tuple) else v)


def _sizes(m: nn.Module, old: dict[str, Any] | None) -> dict[str, Any]:
    w = getattr(m, "weight", None)
    if isinstance(m, nn.Linear):
        return {"out_features": w.shape[0], "in_features": w.shape[1]}
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        return {"in_channels": w.shape[0], "out_channels": w.shape[1] * m.groups}
    if isinstance(m, nn.modules.conv._ConvNd):
        groups = old["groups"] if old else m.groups
        if old and old["groups"] > 1 and old["in_channels"] == old["groups"]:  # depthwise: whole groups go
            groups = w.shape[0] // (old["out_channels"] // old["groups"])
        return {"out_channels": w.shape[0], "groups": groups, "in_channels": groups * w.shape[1]}
    if isinstance(m, nn.modules.batchnorm._NormBase):
        ref = w if w is not None else m.running_mean
        return {"num_features": ref.shape[0]} if ref is not None else {}
    if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and w is not None:
        return {"normalized_shape": tuple(w.shape)}
    if isinstance(m, nn.Embedding):
        return {"num_embeddings": w.shape[0], "embedding_dim": w.shape[1]}
    if type(m).__name__ == "Conv1D" and hasattr(m, "nf"):  # Hugging Face GPT-2 style (in, out)
        return {"nf": w.shape[1]}
    return _attention_sizes(m)


def _attention_sizes(m: nn.Module) -> dict[str, Any]:
    head_dim = getattr(m, "head_dim", None) or getattr(m, "attention_head_size", None)
    if not isinstance(head_dim, int):
        return {}
    children = dict(m.named_children())
    q = next((children[n] for n in Q_NAMES if n in children), None)
    k = next((children[n] for n in K_NAMES if n in children), None)
    fused = next((children[n] for n in FUSED_NAMES if n in children), None)
    if q is not None:
        q_size = _out_size(q)
        kv_size = _out_size(k) if k is not None else q_size
    elif fused is not None:
        q_size = kv_size = _out_size(fused) // 3
    else:
        return {}
    heads, kv = q_size // head_dim, kv_size // head_dim
    out: dict[str, Any] = {a: heads for a in HEAD_ATTRS if isinstance(getattr(m, a, None), int)}
    out.update({a: kv for a in KV_ATTRS if isinstance(getattr(m, a, None), int)})
    if isinstance(getattr(m, "num_key_value_groups", None), int):
        out["num_key_value_groups"] = heads // max(kv, 1)
    if isinstance(getattr(m, "split_size", None), int):
        out["split_size"] = q_size
    if isinstance(getattr(m, "all_head_size", None), int):
        out["all_head_size"] = q_size
    return out


def _out_size(layer: nn.Module) -> int:
    w = layer.weight
    return w.shape[1] if type(layer).__name__ == "Conv1D" else w.shape[0]


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

"""Module size attributes that follow parameter shapes: ``in_features``/``out_features``,
conv ``groups`` and channels, norm widths, embedding sizes, attention head counts (query, key/value,
``num_key_value_groups``, GPT-2's ``split_size``, BERT's ``all_head_size``). Structural removal
calls :func:`sync_attributes` after slicing parameters; reloading a pruned model calls it after
resizing a fresh instance to the recorded shapes."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .adapters import GENERIC, AttentionLayout, adapter_for


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
    layout = adapter_for(model).attention
    changes: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        new = _sizes(m, before.get(name), layout)
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


def _sizes(m: nn.Module, old: dict[str, Any] | None, layout: AttentionLayout = GENERIC.attention) -> dict[str, Any]:
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
    return _attention_sizes(m, layout)


def _attention_sizes(m: nn.Module, layout: AttentionLayout) -> dict[str, Any]:
    head_dim = getattr(m, "head_dim", None) or getattr(m, "attention_head_size", None)
    if not isinstance(head_dim, int):
        return {}
    children = dict(m.named_children())
    q = next((children[n] for n in layout.query if n in children), None)
    k = next((children[n] for n in layout.key if n in children), None)
    fused = next((children[n] for n in layout.fused if n in children), None)
    if q is not None:
        q_size = _out_size(q)
        kv_size = _out_size(k) if k is not None else q_size
    elif fused is not None and (size := _out_size(fused)) is not None:
        q_size = kv_size = size // 3
    else:
        return {}
    if q_size is None or kv_size is None:
        return {}
    heads, kv = q_size // head_dim, kv_size // head_dim
    out: dict[str, Any] = {a: heads for a in layout.head_attrs if isinstance(getattr(m, a, None), int)}
    out.update({a: kv for a in layout.kv_attrs if isinstance(getattr(m, a, None), int)})
    if isinstance(getattr(m, "num_key_value_groups", None), int):
        out["num_key_value_groups"] = heads // max(kv, 1)
    if isinstance(getattr(m, "split_size", None), int):
        out["split_size"] = q_size
    if isinstance(getattr(m, "all_head_size", None), int):
        out["all_head_size"] = q_size
    return out


def _out_size(layer: nn.Module) -> int | None:
    w = getattr(layer, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return None  # a projection of its own kind (no plain weight): its sizes are not read off
    return w.shape[1] if type(layer).__name__ == "Conv1D" else w.shape[0]

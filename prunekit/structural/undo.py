"""Put a model back as it was when a structural prune fails halfway.

Removal replaces tensors (``p.data = p.data.index_select(...)``), swaps modules and sets
attributes; it never writes into a tensor it keeps. So a snapshot of references is enough to
undo it: each module's attribute, parameter, buffer and child dicts (shallow copies), each
tensor's data, and each config object's fields. Nothing is copied, so the snapshot costs no
memory until removal has replaced tensors (then the old ones stay alive until the prune ends).
"""
from __future__ import annotations

import copy
from typing import Any

from torch import Tensor, nn


class Undo:
    """``Undo(model)`` before the first change; ``restore()`` on failure puts every module,
    tensor and config field back."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers), dict(m._modules))
                        for m in model.modules()]
        tensors = {id(t): t for m in model.modules() for t in (*m._parameters.values(), *m._buffers.values())
                   if isinstance(t, Tensor)}
        self.data = [(t, t.data, t.grad if isinstance(t, nn.Parameter) else None) for t in tensors.values()]
        self.configs = [(c, copy.copy(c.__dict__)) for c in _configs(getattr(model, "config", None))]

    def restore(self) -> None:
        for m, attrs, params, buffers, children in self.modules:
            m.__dict__.clear()
            m.__dict__.update(attrs)
            for live, saved in ((m._parameters, params), (m._buffers, buffers), (m._modules, children)):
                live.clear()
                live.update(saved)
        for t, data, grad in self.data:
            t.data = data
            if isinstance(t, nn.Parameter):
                t.grad = grad
        for c, fields in self.configs:
            c.__dict__.clear()
            c.__dict__.update(fields)


def _configs(config: Any) -> list[Any]:
    """A config and the configs nested in it (``text_config``...)."""
    if config is None or not hasattr(config, "__dict__"):
        return []
    out = [config]
    for value in vars(config).values():
        if type(value).__name__.endswith("Config") and hasattr(value, "to_dict"):
            out += _configs(value)
    return out

"""Mixture-of-experts layouts: fused expert tensors, routers, and an expert loop that shows
each expert's inputs to calibration.

transformers 5 stores a layer's experts as 3-D parameters, ``gate_up_proj`` (or ``up_proj``)
``(experts, out, in)`` and ``down_proj`` ``(experts, hidden, intermediate)`` (``(experts, in,
out)`` when ``is_transposed``), in modules decorated with ``use_experts_implementation``,
which also records ``has_gate``, ``has_bias`` and ``has_post_expert_norm``. Each expert's
matrix is its own pruning problem, calibrated on exactly the tokens routed to that expert:
:func:`watched_forward` runs the layer's experts one by one (in index order) and calls
``arrive`` with each projection's input before using it. It computes what the layer's
eager forward computes; only the summation order of ``index_add_`` may differ.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MethodType
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UnsupportedModelError

#: arrive(expert index, projection parameter name, input (tokens, in))
Arrive = Callable[[int, str, Tensor], None]


@dataclass(frozen=True)
class ExpertsLayout:
    """How one fused experts module stores its weights."""

    count: int
    params: tuple[str, ...]  # in the order an expert uses them: (gate_)up, then down
    transposed: bool
    has_gate: bool
    has_bias: bool


def experts_layout(module: nn.Module) -> ExpertsLayout | None:
    """The layout of a transformers fused-experts module, or None for any other module."""
    if not hasattr(module, "has_gate") or not hasattr(module, "is_transposed"):
        return None
    up = "gate_up_proj" if module.has_gate else "up_proj"
    params = (up, "down_proj")
    tensors = [getattr(module, p, None) for p in params]
    if not all(isinstance(t, Tensor) and t.dim() == 3 for t in tensors):
        return None
    count = int(tensors[0].shape[0])
    if tensors[1].shape[0] != count:
        return None
    return ExpertsLayout(count, params, bool(module.is_transposed), bool(module.has_gate),
                         bool(getattr(module, "has_bias", False)))


#: names a mixture-of-experts layer gives its router (Mixtral/Qwen: gate; GPT-OSS, PhiMoE, Llama 4,
#: GraniteMoE, JetMoE: router)
ROUTER_NAMES = ("gate", "router")


def router_weight(router: nn.Module) -> Tensor | None:
    """The ``(experts, hidden)`` matrix of a router: its own ``weight``, or the first 2-D
    parameter inside it (JetMoE's ``router.layer``, HunYuan's ``gate.wg``)."""
    w = getattr(router, "weight", None)
    if isinstance(w, Tensor) and w.dim() == 2:
        return w
    return next((p for p in router.parameters() if p.dim() == 2), None)


def router_of(module: nn.Module) -> tuple[str, nn.Module] | None:
    """``(name, router)`` of a mixture-of-experts layer (a module with ``experts`` and a router
    child), or None."""
    if not isinstance(getattr(module, "experts", None), nn.Module):
        return None
    for name in ROUTER_NAMES:
        router = getattr(module, name, None)
        if isinstance(router, nn.Module) and router_weight(router) is not None:
            return name, router
    return None


def router_names(root: nn.Module) -> set[str]:
    """Names (relative to ``root``) of MoE routers and every module inside them (they stay dense)."""
    names = set()
    for name, m in root.named_modules():
        found = router_of(m)
        if found is not None:
            base = f"{name}.{found[0]}" if name else found[0]
            names.update(f"{base}.{sub}" if sub else base for sub, _ in found[1].named_modules())
    return names


def _project(module: nn.Module, layout: ExpertsLayout, param: str, e: int, x: Tensor) -> Tensor:
    w = getattr(module, param)[e]  # (out, in), or (in, out) when transposed
    b = getattr(module, f"{param}_bias")[e] if layout.has_bias else None
    return F.linear(x, w.t() if layout.transposed else w, b)


def expert_loop(module: nn.Module, layout: ExpertsLayout, arrive: Arrive, hidden_states: Tensor,
                top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """``(tokens, hidden)`` -> ``(tokens, hidden)``: every routed expert on its tokens, weighted."""
    if getattr(module, "_is_expert_parallel", False):
        raise UnsupportedModelError(f"{type(module).__name__} is expert-parallel; calibrate it on one process")
    out = torch.zeros_like(hidden_states)  # (tokens, hidden)
    up, down = layout.params
    for e in range(layout.count):
        token, slot = torch.where(top_k_index == e)  # (n_e,), (n_e,)
        if token.numel() == 0:
            continue
        x = hidden_states[token]  # (n_e, hidden)
        arrive(e, up, x)
        h = _project(module, layout, up, e, x)
        h = module._apply_gate(h) if layout.has_gate else module.act_fn(h)  # (n_e, intermediate)
        arrive(e, down, h)
        y = _project(module, layout, down, e, h)  # (n_e, hidden)
        if getattr(module, "has_post_expert_norm", False):
            y = module.post_expert_norm(y)
        y = y * top_k_weights[token, slot, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


class _Restore:
    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)


def watch_experts(module: nn.Module, arrive: Arrive) -> _Restore:
    """Run ``module``'s experts through :func:`expert_loop` until ``remove()`` is called."""
    layout = experts_layout(module)
    if layout is None:
        raise UnsupportedModelError(f"{type(module).__name__} is not a fused-experts module")

    def forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        return expert_loop(self, layout, arrive, hidden_states, top_k_index, top_k_weights)

    module.forward = MethodType(forward, module)
    return _Restore(module)


__all__ = ["ExpertsLayout", "experts_layout", "router_names", "router_of", "router_weight", "expert_loop", "watch_experts"]

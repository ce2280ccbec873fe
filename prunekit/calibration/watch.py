"""Seeing the input of every target layer as a block runs: forward pre-hooks on Linear and
Conv1D layers, and the expert loop of :mod:`prunekit.models.moe` for fused experts."""
from __future__ import annotations

from typing import Any, Callable

from torch import Tensor, nn

from ..models.moe import watch_experts
from ..targets import Target

#: arrive(target name, its input tensor)
Arrive = Callable[[str, Tensor], None]


def watch(targets: dict[str, Target], arrive: Arrive) -> list[Any]:
    """Call ``arrive(name, x)`` just before each target uses its input ``x``; returns handles
    (``.remove()`` each to stop)."""
    handles: list[Any] = []
    experts: dict[int, tuple[nn.Module, dict[tuple[int, str], str]]] = {}
    def pre_hook(name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            arrive(name, args[0])  # returns nothing: the layer's inputs are never replaced

        return hook

    for name, t in targets.items():
        if t.expert is None:
            handles.append(t.module.register_forward_pre_hook(pre_hook(name)))
        else:
            experts.setdefault(id(t.module), (t.module, {}))[1][(t.expert, t.param)] = name
    for module, names in experts.values():
        def on_expert(e: int, param: str, x: Tensor, names: dict[tuple[int, str], str] = names) -> None:
            name = names.get((e, param))
            if name is not None:
                arrive(name, x)

        handles.append(watch_experts(module, on_expert))
    return handles


def unwatch(handles: list[Any]) -> None:
    for h in handles:
        h.remove()

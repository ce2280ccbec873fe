"""The one target selector: which weights are candidates (supported layer types, names, the
ignore list, heads and embeddings excluded) and the ``(out, in)`` view every score and pattern
works on. One-shot pruning selects inside each block (:func:`select_layers`: Linear, Conv1D and
fused experts); training-time pruning over the whole model (:func:`prunable_parameters`:
Linear, Conv and Conv1D weights).

A :class:`Target` is one weight matrix that is pruned as its own problem: an ``nn.Linear``, a
transformers ``Conv1D`` (a Linear stored as ``(in, out)``), or one expert's slice of a fused
3-D expert tensor (transformers 5 MoE layers keep all experts in ``(experts, out, in)``
parameters). Routers stay dense: they decide where tokens go, and they are tiny.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .models.moe import ExpertsLayout, experts_layout, router_names


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 style Conv1D: a Linear with a transposed (in, out) weight.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _heads(model: nn.Module) -> set[int]:
    """ids of output heads left dense by default: a Hugging Face model's output embeddings and
    any layer whose weight is an embedding table (tied heads)."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    heads = {id(m) for m in model.modules() if id(getattr(m, "weight", None)) in tables and not isinstance(m, nn.Embedding)}
    get = getattr(model, "get_output_embeddings", None)
    try:
        out = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        out = None
    if isinstance(out, nn.Module):
        heads.add(id(out))
    return heads


def prunable_parameters(model: nn.Module, ignore: Iterable[str] = (),
                        types: tuple[type[nn.Module], ...] = PRUNABLE_TYPES,
                        include_heads: bool = False) -> dict[str, nn.Parameter]:
    """The ``weight`` of every Linear/Conv module (and transformers ``Conv1D``) by full
    parameter name, minus names matching a regular expression in ``ignore``. Biases, norms and
    embeddings are never candidates; a Hugging Face LM head (tied or not) is left dense unless
    ``include_heads``, as in one-shot pruning."""
    patterns = [re.compile(rx) for rx in ignore]
    heads = set() if include_heads else _heads(model)
    params = {}
    for mod_name, module in model.named_modules():
        if id(module) in heads:
            continue
        if (isinstance(module, types) or _is_conv1d(module)) and isinstance(getattr(module, "weight", None),
                                                                           nn.Parameter):
            name = f"{mod_name}.weight" if mod_name else "weight"
            if not any(rx.search(name) for rx in patterns):
                params[name] = module.weight
    if not params:
        raise ConfigError(
            f"no prunable parameters in {type(model).__name__} (looked for {[t.__name__ for t in types]}"
            f" weights, ignore={list(ignore)}); check the model or the ignore list"
        )
    return params


def transposed_names(model: nn.Module, params: Mapping[str, nn.Parameter]) -> frozenset[str]:
    """Names among ``params`` of weights stored ``(in, out)`` (transformers ``Conv1D``)."""
    conv1d = {id(m.weight) for m in model.modules() if _is_conv1d(m)}
    return frozenset(n for n, p in params.items() if id(p) in conv1d)




def is_supported(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


@dataclass(frozen=True, eq=False)
class Target:
    """One prunable weight matrix. ``param`` names the parameter of ``module``; ``expert``
    indexes a fused ``(experts, ...)`` parameter; ``transposed``: stored as ``(in, out)``."""

    name: str
    module: nn.Module
    param: str = "weight"
    expert: int | None = None
    transposed: bool = False
    channels_first: bool = False  # a convolution: input features on dim 1 (statistics only)

    def weight(self) -> Tensor:
        """The weight as an (out, in) view (writes through)."""
        w = getattr(self.module, self.param).detach()
        w = w[self.expert] if self.expert is not None else w
        return w.t() if self.transposed else w

    @torch.no_grad()
    def set_weight(self, weight: Tensor) -> None:
        """Write an (out, in) weight back, keeping the parameter's dtype and device."""
        view = self.weight()
        view.copy_(weight.to(device=view.device, dtype=view.dtype))

    @property
    def shape(self) -> tuple[int, int]:
        out_f, in_f = self.weight().shape
        return int(out_f), int(in_f)


def as_target(module: nn.Module | Target, name: str = "") -> Target:
    if isinstance(module, Target):
        return module
    conv = isinstance(module, nn.modules.conv._ConvNd)
    return Target(name, module, transposed=_is_conv1d(module), channels_first=conv)


def weight_2d(module: nn.Module | Target) -> Tensor:
    """The layer's weight as an (out, in) view."""
    return as_target(module).weight()


def set_weight_2d(module: nn.Module | Target, weight: Tensor) -> None:
    """Write an (out, in) weight back, keeping the parameter's dtype and device."""
    as_target(module).set_weight(weight)


def _ignored(name: str, ignore: Iterable[str]) -> bool:
    return any(re.search(rx, name) for rx in ignore)


def _expert_targets(full: str, module: nn.Module, layout: ExpertsLayout) -> list[Target]:
    """One target per expert and projection, in the order the experts run them."""
    return [Target(f"{full}.{e}.{param}", module, param, e, layout.transposed)
            for e in range(layout.count) for param in layout.params]


def select_layers(root: nn.Module, prefix: str, ignore: tuple[str, ...]) -> dict[str, Target]:
    """Prunable weights under ``root`` by full name, minus ignored ones, in module order.
    Parameters of other layer types stay dense and are named by :func:`left_dense`."""
    return _scan(root, prefix, ignore)[0]


def left_dense(root: nn.Module, prefix: str, ignore: tuple[str, ...]) -> dict[str, list[int]]:
    """``name -> shape`` of the parameters under ``root`` that one-shot pruning leaves dense
    because no supported layer holds them (Mamba's ``A_log``, a depthwise ``conv1d`` kernel,
    RWKV's ``time_mix_*``): neither a target, a router, a norm-like vector nor ignored. The
    report lists them, so nothing is skipped silently."""
    return _scan(root, prefix, ignore)[1]


def _scan(root: nn.Module, prefix: str, ignore: tuple[str, ...]) -> tuple[dict[str, Target], dict[str, list[int]]]:
    layers: dict[str, Target] = {}
    covered: set[int] = set()
    routers = router_names(root)
    for name, module in root.named_modules():
        full = f"{prefix}.{name}" if name else prefix
        if name in routers:
            covered.update(id(p) for p in module.parameters(recurse=False))
            continue
        layout = experts_layout(module)
        if layout is not None:
            covered.update(id(getattr(module, p)) for p in layout.params)
            layers.update((t.name, t) for t in _expert_targets(full, module, layout) if not _ignored(t.name, ignore))
        elif is_supported(module):
            covered.update(id(p) for p in module.parameters(recurse=False))
            if not _ignored(full, ignore):
                layers[full] = as_target(module, full)
    dense = {f"{prefix}.{name}": list(param.shape) for name, param in root.named_parameters()
             if param.dim() >= 2 and id(param) not in covered and not _ignored(f"{prefix}.{name}", ignore)}
    return layers, dense

"""Expert pruning for mixture-of-experts layers: remove whole experts and resize the router.

A MoE layer is any module with a ``gate`` (router; weight ``(experts, hidden)``) and
``experts`` (either 3-D parameters ``(experts, ...)`` as in transformers 5, or an
``nn.ModuleList``). Removing expert ``e`` equals masking its router logit to ``-inf``.
Routing-frequency scoring follows Lu et al., "Not All Experts are Equal: Efficient Expert
Pruning and Skipping for Mixture-of-Experts LLMs" (ACL 2024), in its simplest form: the
routing weight mass each expert receives on calibration data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..calibration import CalibrationData, Observer, RunOptions, run_sequential
from ..errors import ConfigError, StructureError
from ..models.adapters import GENERIC
from ..models.decoder import block_list
from ..models.moe import router_of, router_weight
from ..registry import Registry
from ..scoring.random import uniform_scores

#: the generic adapter's expert-count fields (attributes of MoE modules use the same names)
EXPERT_ATTRS = GENERIC.sizes["experts"]


@dataclass(frozen=True)
class MoELayer:
    name: str
    module: nn.Module
    router_name: str = "gate"

    @property
    def router(self) -> nn.Module:
        return getattr(self.module, self.router_name)

    @property
    def router_weight(self) -> Tensor:
        return router_weight(self.router)  # (experts, hidden)

    @property
    def count(self) -> int:
        return self.router_weight.shape[0]


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every module with ``experts`` and a router (``gate`` or ``router``)."""
    return [MoELayer(name, m, found[0]) for name, m in model.named_modules() if (found := router_of(m)) is not None]


#: score(model, MoE layers, calibration data or None, generator, runner options) -> per layer (experts,)
ExpertScore = Callable[[nn.Module, list[MoELayer], "CalibrationData | None", torch.Generator, RunOptions],
                       list[Tensor]]
EXPERT_SCORES: Registry[ExpertScore] = Registry("expert score", "expert_scores")


@EXPERT_SCORES.register("frequency",
                        paper="Lu et al. 2024, Not All Experts are Equal: Efficient Expert Pruning and Skipping for "
                              "Mixture-of-Experts Large Language Models")
def frequency(model: nn.Module, layers: list[MoELayer], data: CalibrationData | None, gen: torch.Generator,
              options: RunOptions) -> list[Tensor]:
    """Routing weight per expert on calibration data.

    Per layer, ``(experts,)`` routing weight summed over calibration tokens, the routers
    watched while the sequential runner computes each block."""
    if not data:
        raise ConfigError("expert frequency needs calibration data (--calib TEXT or data=...)")
    mass = [torch.zeros(layer.count, dtype=torch.float64, device=layer.router_weight.device) for layer in layers]
    index = {id(layer.router): i for i, layer in enumerate(layers)}

    def record(module: nn.Module, args: tuple, out: Any) -> None:
        i = index[id(module)]
        if not (isinstance(out, tuple) and len(out) == 3):
            raise StructureError(f"router of {layers[i].name} does not return (logits, weights, indices)")
        _, weights, indices = out
        mass[i].index_add_(0, indices.reshape(-1).to(mass[i].device), weights.reshape(-1).double().detach().to(mass[i].device))

    def hooks(i: int, block: nn.Module) -> list[Any]:
        return [m.register_forward_hook(record) for m in block.modules() if id(m) in index]

    run_sequential(model, data, block_list(model), [{} for _ in range(_block_count(model))], lambda n, s: None,
                   modifies=False, options=options, observer=Observer(hooks=hooks))
    return [m.float().cpu() for m in mass]


def _block_count(model: nn.Module) -> int:
    found = block_list(model)
    return len(found[1]) if found is not None else 1


@EXPERT_SCORES.register("router_norm")
def router_norm(model: nn.Module, layers: list[MoELayer], data: CalibrationData | None, gen: torch.Generator,
                options: RunOptions) -> list[Tensor]:
    """L2 norm of each expert's router row (data-free)."""
    return [layer.router_weight.detach().float().norm(dim=1) for layer in layers]


@EXPERT_SCORES.register("random")
def random_experts(model: nn.Module, layers: list[MoELayer], data: CalibrationData | None, gen: torch.Generator,
                   options: RunOptions) -> list[Tensor]:
    """Random expert scores: the control."""
    return [uniform_scores(layer.count, gen) for layer in layers]


def _per_expert(layer: MoELayer, n: int) -> list[tuple[str, Tensor]]:
    """Tensors with one entry per expert beside the experts themselves: every router parameter
    and buffer, and the layer's own vectors with ``n`` entries (AFMoE's ``expert_bias``,
    DeepSeek-style ``e_score_correction_bias``)."""
    prefix = layer.router_name + "."
    tensors = [(prefix + k, t) for k, t in (*layer.router.named_parameters(), *layer.router.named_buffers())]
    own = (*layer.module.named_parameters(recurse=False), *layer.module.named_buffers(recurse=False))
    return tensors + [(k, t) for k, t in own if t.dim() == 1 and t.shape[0] == n]


def remove_experts(model: nn.Module, layer: MoELayer, drop: list[int]) -> None:
    """Remove experts ``drop`` from one MoE layer in place: expert weights, router rows, counts."""
    n = layer.count
    keep = torch.tensor([e for e in range(n) if e not in set(drop)], dtype=torch.long)
    top_k = getattr(layer.router, "top_k", getattr(layer.module, "top_k", 1))
    if keep.numel() < max(int(top_k), 1):
        raise ConfigError(f"{layer.name}: keeping {keep.numel()} experts is fewer than top_k={top_k}")
    experts = layer.module.experts
    with torch.no_grad():
        if isinstance(experts, nn.ModuleList):
            layer.module.experts = nn.ModuleList([experts[i] for i in keep.tolist()])
        else:
            for p in experts.parameters(recurse=False):
                if p.shape[0] != n:
                    raise StructureError(f"{layer.name}.experts has a parameter whose first dim is not {n} experts")
                p.data = p.data.index_select(0, keep.to(p.device)).contiguous()
        for name, p in _per_expert(layer, n):
            dims = [d for d in range(p.dim()) if p.shape[d] == n]
            if not dims:
                raise StructureError(f"{layer.name}.{name} {tuple(p.shape)} has no dim of {n} experts; "
                                     "prunekit cannot resize this router")
            p.data = p.data.index_select(dims[0], keep.to(p.device)).contiguous()
    for m in layer.router.modules():
        if isinstance(m, nn.Linear):
            m.out_features = m.weight.shape[0]
    for m in (layer.module, *layer.router.modules(), experts):
        for attr in EXPERT_ATTRS:
            if isinstance(getattr(m, attr, None), int):
                setattr(m, attr, keep.numel())

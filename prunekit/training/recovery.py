"""Recovery after one-shot pruning with few trainable parameters, masks kept (PERP: Zimmer et
al. 2023, "PERP: Rethinking the Prune-Retrain Paradigm in the Era of LLMs"; they find that
retraining only biases and normalisation parameters, or low-rank adapters, recovers most of
the accuracy lost to magnitude pruning).

- :func:`bias_norm_parameters`: freeze everything but biases and normalisation parameters
  (the pruned weights are frozen, so their zeros trivially stay).
- :class:`MaskedLoRALinear` / :func:`add_masked_lora`: LoRA adapters whose update is multiplied
  by the layer's keep-mask (PERP's MaskLoRA), so merging keeps the sparsity exactly.
- :func:`add_peft_lora` / :func:`merge_peft_lora`: the same through ``peft`` (optional
  dependency). peft's adapters are dense during training; merging re-zeroes the pruned
  positions, so the merged model differs from the trained one there (use the masked LoRA
  above when that matters).
"""
from __future__ import annotations

import logging
import math
from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

from ..errors import ConfigError, PrunekitError

log = logging.getLogger(__name__)

NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm,
                                           nn.modules.instancenorm._InstanceNorm)


def _is_norm(module: nn.Module) -> bool:
    # Model-specific norms (LlamaRMSNorm, T5LayerNorm...) are matched by class name.
    return isinstance(module, NORM_TYPES) or "norm" in type(module).__name__.lower()


def bias_norm_parameters(model: nn.Module, *, biases: bool = True, norms: bool = True) -> list[nn.Parameter]:
    """Set ``requires_grad`` only on biases and/or normalisation parameters; return them (give
    these to the optimizer)."""
    if not (biases or norms):
        raise ConfigError("bias_norm_parameters needs biases=True or norms=True; nothing would train")
    for p in model.parameters():
        p.requires_grad_(False)
    chosen: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if (norms and _is_norm(module)) or (biases and name == "bias"):
                chosen[id(p)] = p.requires_grad_(True)
    if not chosen:
        raise ConfigError(f"{type(model).__name__} has no biases or normalisation parameters to recover with")
    return list(chosen.values())


class MaskedLoRALinear(nn.Module):
    """``y = x W^T + b + x ((B A) ⊙ keep)^T * alpha / r`` around a frozen pruned Linear.

    ``A (r, in)`` starts Kaiming-uniform and ``B (out, r)`` at zero, so training starts at the
    pruned model; ``keep (out, in)`` is True where the base weight survives.
    """

    def __init__(self, base: nn.Linear, pruned: Tensor, rank: int = 8, alpha: float = 16.0) -> None:
        super().__init__()
        if rank < 1:
            raise ConfigError(f"LoRA rank {rank} must be >= 1")
        self.base = base.requires_grad_(False)
        self.register_buffer("keep", ~pruned.to(torch.bool))  # (out, in)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype, device=base.weight.device))  # (r, in)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype, device=base.weight.device))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = alpha / rank

    def delta(self) -> Tensor:
        return (self.lora_b @ self.lora_a) * self.keep * self.scale  # (out, in)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + nn.functional.linear(x, self.delta())

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base Linear with the masked update folded in (same sparsity as before)."""
        self.base.weight.add_(self.delta())
        return self.base.requires_grad_(True)


def add_masked_lora(model: nn.Module, masks: Mapping[str, Tensor], rank: int = 8,
                    alpha: float = 16.0) -> list[nn.Parameter]:
    """Wrap every Linear whose ``{name}.weight`` has a mask in a :class:`MaskedLoRALinear`;
    freeze everything else. Returns the adapter parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    params: list[nn.Parameter] = []
    for pname, mask in masks.items():
        mod_name = pname.rsplit(".", 1)[0] if pname.endswith(".weight") else None
        module = model.get_submodule(mod_name) if mod_name is not None else None
        if not isinstance(module, nn.Linear):
            raise ConfigError(f"masked LoRA wraps nn.Linear layers; {pname!r} is not the weight of one")
        wrapped = MaskedLoRALinear(module, mask, rank, alpha)
        parent, _, child = mod_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, wrapped)
        params += [wrapped.lora_a, wrapped.lora_b]
    return params


def merge_masked_lora(model: nn.Module) -> nn.Module:
    """Replace every :class:`MaskedLoRALinear` by its merged Linear, in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, MaskedLoRALinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.merged())
    return model


def add_peft_lora(model: nn.Module, target_modules: Iterable[str], rank: int = 8, alpha: float = 16.0) -> nn.Module:
    """Wrap ``model`` with peft LoRA adapters on ``target_modules`` (peft's module-name
    matching). Needs ``pip install peft``."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise PrunekitError("LoRA recovery through peft needs `pip install peft` "
                            "(or use add_masked_lora, which needs nothing)") from None
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules)))


@torch.no_grad()
def merge_peft_lora(peft_model: nn.Module, masks: Mapping[str, Tensor]) -> nn.Module:
    """Merge peft adapters into the base weights and re-zero the pruned positions (``masks``
    keyed by the original model's parameter names)."""
    merged = peft_model.merge_and_unload()
    params = dict(merged.named_parameters())
    for name, mask in masks.items():
        if name not in params:
            raise ConfigError(f"mask names {name!r}, which the merged model does not have")
        params[name].masked_fill_(mask.to(params[name].device), 0)
    return merged


__all__ = ["bias_norm_parameters", "MaskedLoRALinear", "add_masked_lora", "merge_masked_lora",
           "add_peft_lora", "merge_peft_lora"]

"""Masks that survive training: pruned weights stay exactly zero through every optimizer step.

A :class:`Masker` holds one boolean mask per parameter (True = pruned, as every pattern in
:mod:`prunekit.patterns` returns) and enforces it three ways, so no optimizer can revive a
pruned weight:

1. a gradient hook zeroes the gradient at pruned positions (so gradient clipping, Adam's
   moments and momentum never see them);
2. an optimizer step post-hook writes zeros back into the weight after every ``step()``
   (weight decay, ``GradScaler.step`` and any custom update included);
3. the same post-hook zeroes every per-parameter optimizer state tensor shaped like the
   weight (``momentum_buffer``, ``exp_avg``, ``exp_avg_sq``...) at pruned positions, so a
   connection that is regrown later (SET/RigL) starts from zero weight and zero state.

Hooks rather than ``torch.nn.utils.parametrize``: the parameters keep their names and
identities, so optimizers, ``state_dict`` keys and Hugging Face ``save_pretrained`` are
unchanged, and :meth:`Masker.detach` leaves a plain dense-format model ("make permanent").
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

from .errors import ConfigError, OptimizerMismatchError

from .targets import PRUNABLE_TYPES, prunable_parameters, transposed_names  # noqa: F401 (re-exported)


def as_2d(t: Tensor) -> Tensor:
    """A weight ``(out, in, *kernel)`` as the ``(out, in * prod(kernel))`` view patterns use."""
    return t.reshape(t.shape[0], -1)


class Masker:
    """Keeps boolean masks (True = pruned) applied to ``params`` through training."""

    def __init__(self, params: Mapping[str, nn.Parameter]) -> None:
        self.params = dict(params)
        self.masks: dict[str, Tensor] = {
            n: torch.zeros_like(p, dtype=torch.bool) for n, p in self.params.items()
        }
        #: Dense gradients of the last backward, kept when ``capture_dense_grads`` is set (RigL).
        self.dense_grads: dict[str, Tensor] = {}
        self.capture_dense_grads = False
        self._handles: list = []
        self._optimizers: list[torch.optim.Optimizer] = []

    # -- masks -----------------------------------------------------------------------
    def set_masks(self, masks: Mapping[str, Tensor]) -> None:
        """Replace masks (True = pruned) for the named parameters and zero those weights."""
        for name, mask in masks.items():
            if name not in self.params:
                raise ConfigError(f"mask for unknown parameter {name!r}; known: {sorted(self.params)}")
            param = self.params[name]
            if tuple(mask.shape) != tuple(param.shape) or mask.dtype != torch.bool:
                raise ConfigError(
                    f"mask for {name} must be a bool tensor of shape {tuple(param.shape)}, "
                    f"got {mask.dtype} {tuple(mask.shape)}"
                )
            self.masks[name] = mask.to(param.device)
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        """Write zeros into every pruned weight and every optimizer state at pruned positions."""
        for name, param in self.params.items():
            param.masked_fill_(self.masks[name], 0)
        for opt in self._optimizers:
            zero_optimizer_state(opt, self.params.values(), self.masks.values())

    # -- training hooks ----------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Install gradient hooks and an after-step hook on ``optimizer``, which must own
        every masked parameter."""
        check_owns(optimizer, self.params)
        if not self._handles:
            for name, param in self.params.items():
                self._handles.append(param.register_hook(self._grad_hook(name)))
        self._handles.append(optimizer.register_step_post_hook(lambda opt, args, kwargs: self.apply()))
        self._optimizers.append(optimizer)
        self.apply()

    def _grad_hook(self, name: str):
        def hook(grad: Tensor) -> Tensor:
            if self.capture_dense_grads:
                # Summed so gradient accumulation over micro-batches is captured whole.
                prev = self.dense_grads.get(name)
                self.dense_grads[name] = grad.detach().clone() if prev is None else prev + grad.detach()
            return grad.masked_fill(self.masks[name], 0)

        return hook

    def detach(self) -> None:
        """Remove every hook; weights keep their zeros (the sparsity becomes permanent)."""
        self.apply()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._optimizers.clear()

    # -- reporting -----------------------------------------------------------------------
    def sparsity(self) -> float:
        """Fraction of masked weights over all masked parameters."""
        pruned = sum(int(m.sum()) for m in self.masks.values())
        return pruned / max(1, sum(m.numel() for m in self.masks.values()))


def check_owns(optimizer: torch.optim.Optimizer, params: Mapping[str, nn.Parameter]) -> None:
    """Raise :class:`OptimizerMismatchError` unless ``optimizer`` updates every parameter."""
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [n for n, p in params.items() if id(p) not in owned]
    if missing:
        raise OptimizerMismatchError(
            f"the optimizer does not own {len(missing)} of the {len(params)} parameters to mask "
            f"(e.g. {missing[:3]}); build the optimizer from this model's parameters "
            "(e.g. torch.optim.SGD(model.parameters(), ...)) after the model is final"
        )


@torch.no_grad()
def zero_optimizer_state(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter],
                         masks: Iterable[Tensor]) -> None:
    """Zero every state tensor of ``optimizer`` shaped like its parameter at masked positions."""
    for param, mask in zip(params, masks):
        for value in optimizer.state.get(param, {}).values():
            if isinstance(value, Tensor) and value.shape == param.shape:
                value.masked_fill_(mask, 0)


def sparsity_report(model: nn.Module, params: Mapping[str, nn.Parameter] | None = None) -> dict[str, dict]:
    """Zeros per parameter (``numel``, ``zeros``, ``sparsity``) plus a ``__total__`` row, over
    ``params`` (default: every prunable weight of ``model``)."""
    params = params if params is not None else prunable_parameters(model)
    rows = {}
    for name, p in params.items():
        zeros = int((p.detach() == 0).sum())
        rows[name] = {"numel": p.numel(), "zeros": zeros, "sparsity": zeros / p.numel()}
    numel = sum(r["numel"] for r in rows.values())
    zeros = sum(r["zeros"] for r in rows.values())
    rows["__total__"] = {"numel": numel, "zeros": zeros, "sparsity": zeros / max(1, numel)}
    return rows


__all__ = ["Masker", "prunable_parameters", "transposed_names", "as_2d", "check_owns", "zero_optimizer_state",
           "sparsity_report", "PRUNABLE_TYPES"]

"""The two recipe stages that train: gradual pruning while fine-tuning, and recovery of a
pruned model with its masks kept. Both train on the recipe's calibration batches (the loss
:class:`~prunekit.calibration.CalibrationData` knows: next-token cross-entropy for text),
cycling through them for ``steps`` optimizer steps."""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import ConfigError
from .rounding import count

log = logging.getLogger(__name__)


def _positive(where: str, **values: float) -> None:
    for name, v in values.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
            raise ConfigError(f"{where}: {name} must be a positive number, got {v!r}")


@dataclass(frozen=True)
class TrainingStage:
    """Gradual pruning while fine-tuning (Zhu & Gupta 2017): the cubic schedule from 0 to
    ``sparsity`` over the first ``prune_fraction`` of ``steps``, every ``frequency`` steps,
    with masks kept through every optimizer step (:class:`~prunekit.training.SparsityController`).
    ``lr``: AdamW learning rate. ``pattern``/``allocation``: as in the weights stage."""

    sparsity: float = 0.5
    steps: int = 100
    frequency: int = 10
    prune_fraction: float = 0.75
    lr: float = 1e-5
    pattern: str = "unstructured"
    allocation: str = "uniform"
    ignore: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        from .allocation import ALLOCATIONS

        object.__setattr__(self, "ignore", tuple([self.ignore] if isinstance(self.ignore, str) else self.ignore))
        _positive("training", steps=self.steps, frequency=self.frequency, lr=self.lr)
        if not 0 < self.prune_fraction <= 1:
            raise ConfigError(f"training: prune_fraction {self.prune_fraction} must be in (0, 1]")
        ALLOCATIONS.get(self.allocation)
        self.schedule()  # validates sparsity and pattern together

    def schedule(self, pattern: Any = None) -> Any:
        from .config import Pattern
        from .schedules import Gradual

        end = max(1, count(self.prune_fraction, self.steps))
        return Gradual(target=self.sparsity, start=0, end=end, frequency=self.frequency, allocation=self.allocation,
                       pattern=pattern or Pattern.parse(self.pattern))


@dataclass(frozen=True)
class RecoveryStage:
    """Recovery with the masks kept (PERP, Zimmer et al. 2023): ``bias_norm`` trains only biases
    and normalisation parameters; ``lora`` trains masked LoRA adapters of ``rank`` and merges
    them. ``steps`` AdamW steps at ``lr``."""

    method: str = "bias_norm"
    steps: int = 50
    lr: float = 1e-4
    rank: int = 8

    def __post_init__(self) -> None:
        if self.method not in ("bias_norm", "lora"):
            raise ConfigError(f"recovery: unknown method {self.method!r}; use 'bias_norm' or 'lora'")
        _positive("recovery", steps=self.steps, lr=self.lr, rank=self.rank)


def _train(model: nn.Module, params: list[nn.Parameter], data: Any, steps: int, lr: float, after_step: Any,
           progress: bool, desc: str) -> list[float]:
    """AdamW over ``params`` for ``steps`` steps cycling through ``data``'s batches; losses."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    was_training = model.training
    model.train()
    try:
        batches = itertools.cycle(data.batches)
        for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
            loss = data.loss(model, next(batches))
            if not torch.isfinite(loss):
                raise ConfigError(f"{desc}: the loss became {float(loss.detach())}; lower lr")
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if after_step is not None:
                after_step(opt)
            losses.append(float(loss.detach()))
    finally:
        model.train(was_training)
    return losses


def run_training(stage: TrainingStage, model: nn.Module, data: Any, progress: bool) -> dict[str, Any]:
    """Fine-tune ``model`` on ``data`` while pruning it gradually; the masks become permanent."""
    from .training import SparsityController

    for p in model.parameters():
        p.requires_grad_(True)
    opt_params = [p for p in model.parameters()]
    controller: list[Any] = []

    def after_step(opt: torch.optim.Optimizer) -> None:
        if not controller:
            controller.append(SparsityController(model, opt, stage.schedule(), ignore=stage.ignore, seed=stage.seed))
        controller[0].step()

    # the controller needs the optimizer, which _train creates: attach on the first step
    losses = _train(model, opt_params, data, stage.steps, stage.lr, after_step, progress, "training (gradual)")
    ctrl = controller[0]
    sparsity = ctrl.sparsity()
    ctrl.make_permanent()
    for p in model.parameters():
        p.requires_grad_(False)
    return {"loss_first": losses[0], "loss_last": losses[-1], "trained_sparsity": sparsity,
            "target_sparsity": stage.sparsity}


def run_recovery(stage: RecoveryStage, model: nn.Module, data: Any, progress: bool) -> dict[str, Any]:
    """Recover ``model`` on ``data``; every weight that is zero before stays zero."""
    from .masking import prunable_parameters
    from .training.recovery import add_masked_lora, bias_norm_parameters, merge_masked_lora

    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    masks = {n: p.detach() == 0 for n, p in prunable_parameters(model).items()}
    if stage.method == "bias_norm":
        params = bias_norm_parameters(model)
        losses = _train(model, params, data, stage.steps, stage.lr, None, progress, "recovery (bias_norm)")
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        linear = {n: m for n, m in masks.items() if isinstance(model.get_submodule(n.rsplit(".", 1)[0]), nn.Linear)}
        params = add_masked_lora(model, linear, rank=stage.rank)
        losses = _train(model, params, data, stage.steps, stage.lr, None, progress, "recovery (lora)")
        merge_masked_lora(model)
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, False))
    with torch.no_grad():  # zeros stay zeros (bias_norm never touches weights; masked LoRA merges masked)
        for name, p in prunable_parameters(model).items():
            if name in masks and masks[name].shape == p.shape:
                p.masked_fill_(masks[name], 0)
    return {"loss_first": losses[0], "loss_last": losses[-1], "method": stage.method, "steps": stage.steps}


__all__ = ["TrainingStage", "RecoveryStage", "run_training", "run_recovery"]

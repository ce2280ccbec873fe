"""Pruning at initialisation: choose the mask before any training, then train it fixed.

Scores here need whole-model gradients, so they are not ``(weight, stats)`` functions of
:mod:`prunekit.scoring`; they live in their own registry, ``INIT_SCORES``, each a function
``(model, params, data, criterion, generator) -> {name: scores}`` (higher = keep), where
``data`` is the :class:`~prunekit.calibration.CalibrationData` every capability shares:

- ``snip``: |θ ⊙ ∂L/∂θ|, the element score ``taylor`` of :mod:`prunekit.scoring` on the loss
  gradient at initialisation (Lee et al. 2019, "SNIP: Single-shot Network Pruning based on
  Connection Sensitivity").
- ``grasp``: θ ⊙ Hg, keeping the weights whose removal would most reduce gradient flow
  (Wang et al. 2020, "Picking Winning Tickets Before Training by Preserving Gradient Flow");
  the first gradient uses the paper's temperature T = 200.
- ``synflow``: |θ ⊙ ∂R/∂θ| with R the output sum of the network with |θ| on an all-ones
  input; data-free and applied iteratively over ``iterations`` rounds with exponentially
  rising sparsity (Tanaka et al. 2020, "Pruning neural networks without any data by
  iteratively conserving synaptic flow").
- ``magnitude`` |θ| and ``random``: the baselines, the same element scores one-shot pruning uses.

Each method's paper allocation is its default (global threshold for snip/grasp/synflow and
magnitude, uniform for random); ``erk``, ``uniform``, ``global_min`` also work. ``shuffle``
permutes each layer's mask (the layerwise-shuffling control of Frankle et al. 2021).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..calibration import CalibrationData, as_calibration
from ..calibration.gradients import loss_gradients
from ..config import Pattern
from ..errors import DataError, ScheduleError
from ..masking import prunable_parameters, transposed_names
from ..registry import Registry
from .base import Masks, check_pattern_target, check_target, element_scores, select_masks, shuffle_masks

#: criterion(outputs, targets) -> scalar loss
LossFn = Callable[[Tensor, Tensor], Tensor]
InitScoreFn = Callable[[nn.Module, Mapping[str, nn.Parameter], CalibrationData, LossFn, torch.Generator],
                       dict[str, Tensor]]


@dataclass(frozen=True)
class InitScore:
    """A registered score at initialisation. ``needs``: ``"data"`` (labelled batches),
    ``"input"`` (one input batch, for its shape only) or ``"nothing"``."""

    fn: InitScoreFn
    needs: Literal["data", "input", "nothing"]
    default_allocation: str
    iterative: bool = False


INIT_SCORES: Registry[InitScore] = Registry("score at initialisation", "init_scores")


def register_init_score(name: str, *, needs: Literal["data", "input", "nothing"], default_allocation: str = "global",
                        iterative: bool = False, paper: str = "") -> Callable[[InitScoreFn], InitScoreFn]:
    """Register ``fn`` as score at initialisation ``name``; ``paper``: its citation (see
    :mod:`prunekit.registry`)."""
    def add(fn: InitScoreFn) -> InitScoreFn:
        INIT_SCORES.register(name, paper=paper)(InitScore(fn, needs, default_allocation, iterative))
        return fn

    return add


def _with_criterion(data: CalibrationData, criterion: LossFn, scale: float = 1.0) -> CalibrationData:
    """``data`` whose loss is ``criterion(model(inputs) / scale, labels)``."""
    def loss(model: nn.Module, batch) -> Tensor:
        b = data.prepared(model, batch)
        return criterion(model(*b.args, **b.kwargs) / scale, b.target)

    return data.with_loss(loss)


@register_init_score("snip", needs="data",
                     paper="Lee et al. 2019, SNIP: Single-shot Network Pruning based on Connection Sensitivity (SNIP)")
def snip(model: nn.Module, params: Mapping[str, nn.Parameter], data: CalibrationData, loss_fn: LossFn,
         generator: torch.Generator) -> dict[str, Tensor]:
    """Connection sensitivity |θ * dL/dθ| at init."""
    grads = loss_gradients(model, _with_criterion(data, loss_fn), params)
    return element_scores("taylor", params, grads=grads)  # |θ ⊙ ∂L/∂θ|, the first-order Taylor score


@register_init_score("grasp", needs="data",
                     paper="Wang et al. 2020, Picking Winning Tickets Before Training by Preserving Gradient Flow "
                           "(GraSP)")
def grasp(model: nn.Module, params: Mapping[str, nn.Parameter], data: CalibrationData, loss_fn: LossFn,
          generator: torch.Generator, temperature: float = 200.0) -> dict[str, Tensor]:
    """Preserve gradient flow: scores θ * Hg."""
    scaled = _with_criterion(data, loss_fn, temperature)
    g = loss_gradients(model, scaled, params)  # g, held fixed
    hg = {n: torch.zeros_like(p) for n, p in params.items()}
    for batch in data:
        loss = scaled.loss(model, batch)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True, allow_unused=True)
        z = sum((gi * g[n]).sum() for n, gi in zip(params, grads) if gi is not None)
        for n, h in zip(params, torch.autograd.grad(z, list(params.values()), allow_unused=True)):
            if h is not None:
                hg[n] += h.detach()
    return {n: p.detach() * hg[n] for n, p in params.items()}


@register_init_score("synflow", needs="input", iterative=True,
                     paper="Tanaka et al. 2020, Pruning neural networks without any data by iteratively conserving "
                           "synaptic flow (SynFlow)")
def synflow(model: nn.Module, params: Mapping[str, nn.Parameter], data: CalibrationData, loss_fn: LossFn,
            generator: torch.Generator) -> dict[str, Tensor]:
    """Synaptic flow |θ * dR/dθ|: data-free, iterative."""
    # Runs on a float64 copy with |θ| (linearised network): R = 1^T (prod_l |W_l|) 1 overflows
    # float32 quickly in deep nets. BatchNorm in eval mode, as in the reference code.
    x0 = data.batches[0].args[0]
    lin = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for p in lin.parameters():
            p.abs_()
    lin_params = dict(lin.named_parameters())
    chosen = [lin_params[n] for n in params]
    ones = torch.ones((1, *x0.shape[1:]), dtype=torch.float64, device=x0.device)
    grads = torch.autograd.grad(lin(ones).sum(), chosen)
    return {n: (q.detach() * g).abs().to(params[n].dtype) for n, q, g in zip(params, chosen, grads)}


@register_init_score("magnitude", needs="nothing")
def magnitude(model: nn.Module, params: Mapping[str, nn.Parameter], data: CalibrationData | None,
              loss_fn: LossFn, generator: torch.Generator) -> dict[str, Tensor]:
    """Weight magnitude |θ| at init: the baseline."""
    return element_scores("magnitude", params)


@register_init_score("random", needs="nothing", default_allocation="uniform")
def random(model: nn.Module, params: Mapping[str, nn.Parameter], data: CalibrationData | None,
           loss_fn: LossFn, generator: torch.Generator) -> dict[str, Tensor]:
    """Seeded random scores at init: the control."""
    return element_scores("random", params, generator=generator)


@dataclass(frozen=True)
class AtInit:
    """One-shot mask at initialisation. ``method``: an INIT_SCORES name; ``allocation``: None
    takes the method's paper default; ``iterations``: rounds for iterative methods (SynFlow:
    100 in the paper); ``shuffle``: layerwise-shuffle the result (control); ``seed``: for
    random scores and shuffling."""

    method: str
    sparsity: float
    allocation: str | None = None
    pattern: Pattern = field(default_factory=Pattern)
    iterations: int = 100
    shuffle: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        INIT_SCORES.get(self.method)
        check_target(self.sparsity, "sparsity")
        check_pattern_target(self.pattern, self.sparsity)
        if self.iterations < 1:
            raise ScheduleError(f"iterations {self.iterations} must be >= 1")

    def sparsity_at_iteration(self, k: int) -> float:
        """SynFlow's exponential schedule: density (1 - s)**(k / iterations) after round k."""
        return 1.0 - (1.0 - self.sparsity) ** (k / self.iterations)


def prune_at_init(model: nn.Module, config: AtInit, batches: Any = None, *, loss_fn: LossFn = F.cross_entropy,
                  params: Mapping[str, nn.Parameter] | None = None) -> Masks:
    """Masks (True = pruned) for ``model``'s prunable weights; the model is left unchanged
    (pass the masks to a :class:`~prunekit.training.SparsityController`). ``batches``: a
    :class:`~prunekit.calibration.CalibrationData`, a list of ``(inputs, targets)`` pairs, or
    an ``(inputs, targets)`` tuple; SynFlow only reads the first input's shape."""
    score = INIT_SCORES.get(config.method)
    params = dict(params) if params is not None else prunable_parameters(model)
    data = None if batches is None or (isinstance(batches, list) and not batches) else as_calibration(batches)
    if score.needs != "nothing" and data is None:
        raise DataError(f"{config.method!r} needs at least one (inputs, targets) batch"
                        + (" (only for the input shape)" if score.needs == "input" else ""))
    if score.needs == "data" and data.kind != "pairs":
        raise DataError(f"{config.method!r} needs labelled (inputs, targets) batches, got {data.kind} data")
    allocation = config.allocation or score.default_allocation
    generator = torch.Generator().manual_seed(config.seed)
    work = copy.deepcopy(model)  # scoring may zero weights (iterative) or change modes
    named = dict(work.named_parameters())
    work_params = {n: named[n] for n in params}
    rounds = config.iterations if score.iterative else 1
    masks: Masks | None = None
    for k in range(1, rounds + 1):
        target = config.sparsity_at_iteration(k) if score.iterative else config.sparsity
        scores = score.fn(work, work_params, data, loss_fn, generator)
        masks = select_masks(scores, target, allocation=allocation, pattern=config.pattern, keep_pruned=masks,
                             transposed=transposed_names(model, params))
        with torch.no_grad():
            for n, p in work_params.items():
                p.masked_fill_(masks[n], 0)
    assert masks is not None
    return shuffle_masks(masks, generator) if config.shuffle else masks


__all__ = ["AtInit", "prune_at_init", "INIT_SCORES", "InitScore", "register_init_score"]

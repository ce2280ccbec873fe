"""Iterative magnitude pruning with rewinding: lottery tickets.

Frankle & Carbin 2019 ("The Lottery Ticket Hypothesis: Finding Sparse, Trainable Neural
Networks"): train, prune a fraction ``rate`` of the surviving weights by magnitude, reset
the survivors to their initial values, retrain; after r rounds the sparsity is
``1 - (1 - rate)**r``. Frankle et al. 2020 ("Stabilizing the Lottery Ticket Hypothesis" /
"Linear Mode Connectivity and the Lottery Ticket Hypothesis") rewind to an early iteration
k instead of 0, which finds tickets in deeper networks.

The controls of the paper are here too: the same masks with a fresh random
initialisation (:func:`reinitialize`), and a random mask with the same layer sparsities on
the rewound weights (:func:`~prunekit.schedules.base.shuffle_masks`).

Rounds are an outer loop around the user's training loop:

    ticket = LotteryTicket(model, Iterative(rounds=5, rate=0.2, rewind_step=0))
    for r in range(ticket.config.rounds + 1):
        opt = make_optimizer(model)
        ctrl = SparsityController(model, opt, masks=ticket.masks)
        for step, batch in enumerate(loader, 1):
            ...; opt.step(); ctrl.step(); ticket.observe(step)
        ctrl.make_permanent()
        if r < ticket.config.rounds:
            ticket.prune_and_rewind()
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..config import Pattern
from ..errors import ConfigError, ScheduleError
from ..masking import prunable_parameters, transposed_names
from .base import Masks, check_target, check_training_score, element_scores, realised_sparsity, select_masks


@dataclass(frozen=True)
class Iterative:
    """``rounds`` of pruning ``rate`` of the survivors each; ``rewind_step``: 0 rewinds to
    initialisation, k > 0 to the weights after k optimizer steps of the first training run;
    ``allocation``: ``uniform`` (layerwise, as Frankle & Carbin's fully connected nets) or
    ``global`` (their deeper convnets); ``pattern``: unstructured or N:M (rounds then step
    down the 1/M grid until N of every M remain); ``channels``: prune whole output channels
    by L2 norm (structured variant, masks only)."""

    rounds: int = 5
    rate: float = 0.2
    rewind_step: int = 0
    allocation: str = "uniform"
    pattern: Pattern = field(default_factory=Pattern)
    channels: bool = False
    score: str = "magnitude"

    def __post_init__(self) -> None:
        check_training_score(self.score)
        if self.channels and self.pattern.kind == "nm":
            raise ScheduleError("channels=True and an N:M pattern exclude each other; choose one")
        if self.rounds < 1:
            raise ScheduleError(f"rounds {self.rounds} must be >= 1")
        if not 0.0 < self.rate < 1.0:
            raise ScheduleError(f"rate {self.rate} must be in (0, 1): the fraction of survivors pruned per round")
        if self.rewind_step < 0:
            raise ScheduleError(f"rewind_step {self.rewind_step} must be >= 0 (0 = rewind to initialisation)")

    def sparsity_at_round(self, r: int) -> float:
        """Target sparsity after ``r`` pruning rounds: ``1 - (1 - rate)**r``; on the 1/M grid
        (never past N of M) for N:M."""
        s = 1.0 - (1.0 - self.rate) ** r
        if self.pattern.kind == "nm":
            return realised_sparsity(min(s, self.pattern.sparsity), self.pattern)
        return s


class LotteryTicket:
    """Holds the rewind point and the current masks of an IMP run over ``model``."""

    def __init__(self, model: nn.Module, config: Iterative, *,
                 params: Mapping[str, nn.Parameter] | None = None, units: Any = ()) -> None:
        self.model = model
        self.config = config
        self.units = [list(g.units) if hasattr(g, "units") else list(g) for g in units]  # for channels=True
        self.params = dict(params) if params is not None else prunable_parameters(model)
        self.round = 0
        self.masks: Masks = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in self.params.items()}
        self.rewind_state: dict[str, Tensor] | None = None
        if config.rewind_step == 0:
            self.rewind_state = _snapshot(model)

    def observe(self, step: int) -> None:
        """Call after every optimizer step of the first run; keeps the weights at ``rewind_step``."""
        if self.rewind_state is None and step == self.config.rewind_step:
            self.rewind_state = _snapshot(self.model)

    def prune_and_rewind(self, input_norms: Mapping[str, Tensor] | None = None,
                         grads: Mapping[str, Tensor] | None = None) -> Masks:
        """Prune to the next round's sparsity by the config's element score (already-pruned
        weights stay pruned), rewind every model tensor to the rewind point, and zero the pruned
        weights. ``input_norms`` / ``grads``: what an activation- or gradient-aware score reads
        (by parameter name), from the training run that just ended."""
        if self.rewind_state is None:
            raise ScheduleError(
                f"no rewind point: training ran fewer than rewind_step={self.config.rewind_step} steps, "
                "or observe(step) was not called after each optimizer step"
            )
        self.round += 1
        target = self.config.sparsity_at_round(self.round)
        check_target(target)
        transposed = transposed_names(self.model, self.params)
        scores = element_scores(self.config.score, self.params, transposed=transposed, input_norms=input_norms,
                                grads=grads, generator=torch.Generator().manual_seed(self.round))
        self.masks = select_masks(scores, target, allocation=self.config.allocation,
                                  pattern=self.config.pattern, keep_pruned=self.masks,
                                  channels=self.config.channels, units=self.units,
                                  transposed=transposed)
        self.rewind()
        return self.masks

    @torch.no_grad()
    def rewind(self) -> None:
        """Load the rewind point into the model and zero the pruned weights."""
        self.model.load_state_dict(self.rewind_state)
        for name, p in self.params.items():
            p.masked_fill_(self.masks[name], 0)

    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "masks": {n: m.cpu() for n, m in self.masks.items()},
                "rewind_state": self.rewind_state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if set(state["masks"]) != set(self.params):
            raise ConfigError("lottery-ticket state names other parameters than this model's prunable weights")
        self.round = int(state["round"])
        self.masks = {n: m.to(self.params[n].device) for n, m in state["masks"].items()}
        self.rewind_state = state["rewind_state"]


def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    return copy.deepcopy({k: v.detach() for k, v in model.state_dict().items()})


@torch.no_grad()
def reinitialize(model: nn.Module, seed: int) -> None:
    """The random re-initialisation control: every submodule with ``reset_parameters`` draws
    fresh weights under ``seed`` (masks are re-applied by the caller's controller)."""
    with torch.random.fork_rng(devices=[]):  # leaves the caller's global RNG untouched
        torch.manual_seed(seed)
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()


__all__ = ["Iterative", "LotteryTicket", "reinitialize"]

"""Scores for groups of coupled units: one ``(units,)`` importance per unit, higher = keep.

Each unit spans slices of several parameters (a conv filter, its BatchNorm entries and the
next layer's input channel); a score aggregates over all of them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import Registry
from ..calibration.stats import InputStats
from ..scoring import SCORES, LayerStats
from ..scoring.random import uniform_scores
from ..scoring.taylor import first_order
from .graph import Member
from .remove import owner_of

UNIT_STRUCTURES = frozenset({"channels", "neurons", "heads", "width"})


@dataclass
class ScoreContext:
    """What a score may read: tensors by name, summed gradients (and, for scores that need
    ``fisher``, the per-sample squared gradients), input moments (by consumer weight name), a
    generator. Scores are created on the device of the model's tensors."""

    model: nn.Module
    grads: dict[str, Tensor] = field(default_factory=dict)
    fisher: dict[str, Tensor] = field(default_factory=dict)  # sum over samples of squared gradients
    moments: dict[str, InputStats] = field(default_factory=dict)
    generator: torch.Generator | None = None

    params: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        self.params = frozenset(n for n, _ in self.model.named_parameters(remove_duplicate=False))

    def is_parameter(self, name: str) -> bool:
        """Weights, not buffers: running statistics say nothing about importance."""
        return name in self.params

    def tensor(self, name: str) -> Tensor:
        module, attr = owner_of(self.model, name)
        return getattr(module, attr).detach()

    def module(self, name: str) -> nn.Module:
        return owner_of(self.model, name)[0]

    def zeros(self, n: int) -> Tensor:
        """(n,) float32 zeros on the model's device."""
        p = next(self.model.parameters(), None)
        return torch.zeros(n, device=p.device if p is not None else None)


UnitScore = Callable[[list[tuple[Member, ...]], ScoreContext], Tensor]


@dataclass(frozen=True)
class GroupScore:
    """A registered score: the function, what it needs (``grads``, ``inputs``), and the
    structures it applies to."""

    fn: UnitScore
    needs: frozenset[str]
    structures: frozenset[str]

    def __call__(self, units: list[tuple[Member, ...]], ctx: ScoreContext) -> Tensor:
        return self.fn(units, ctx)


GROUP_SCORES: Registry[GroupScore] = Registry("structural score", "unit_scores")


def register(name: str, needs: tuple[str, ...] = (), structures: frozenset[str] = UNIT_STRUCTURES, paper: str = ""):
    """Register ``fn`` as unit score ``name`` for ``structures``; ``paper``: its citation (see
    :mod:`prunekit.registry`)."""
    def add(fn: UnitScore) -> UnitScore:
        GROUP_SCORES.register(name, paper=paper)(GroupScore(fn, frozenset(needs), frozenset(structures)))
        return fn

    return add


def check_applies(method: str, structure: str) -> GroupScore:
    """The unit score ``method``, if it applies to ``structure`` (a clear error otherwise)."""
    score = GROUP_SCORES.get(method)
    if structure not in score.structures:
        fits = [n for n in GROUP_SCORES.names() if structure in GROUP_SCORES.get(n).structures]
        raise ConfigError(f"score {method!r} does not apply to {structure}; use one of: {', '.join(fits)}")
    return score


def member_slices(t: Tensor, units: list[tuple[Member, ...]], k: int) -> Tensor:
    """``(units, L, *rest)``: the k-th member's slices of tensor ``t`` for every unit."""
    index = torch.tensor([u[k].index for u in units], dtype=torch.long, device=t.device)  # (units, L)
    return t.movedim(units[0][k].dim, 0)[index]


def _per_member(units: list[tuple[Member, ...]], ctx: ScoreContext, fn: Callable[[Tensor, int], Tensor],
                select: Callable[[Member, ScoreContext], bool] = lambda m, c: True) -> Tensor:
    total = ctx.zeros(len(units))
    for k, m in enumerate(units[0]):
        if select(m, ctx) and ctx.is_parameter(m.param):
            total += fn(member_slices(ctx.tensor(m.param).float(), units, k), k)
    return total


def _element(name: str, t: Tensor, **stats: Tensor) -> Tensor:
    """The element score ``name`` of :data:`prunekit.scoring.SCORES` on a tensor's slices."""
    return SCORES.get(name)(t, LayerStats(**stats))


@register("l2", paper="Li et al. 2017, Pruning Filters for Efficient ConvNets")
def l2(units: list[tuple[Member, ...]], ctx: ScoreContext) -> Tensor:
    """L2 norm of the unit's weights (data-free).

    The L2 norm of the magnitude scores of all the unit's weights."""
    return _per_member(units, ctx, lambda s, k: _element("magnitude", s).pow(2).flatten(1).sum(1)).sqrt()


@register("l1", paper="Li et al. 2017, Pruning Filters for Efficient ConvNets")
def l1(units: list[tuple[Member, ...]], ctx: ScoreContext) -> Tensor:
    """L1 norm of the unit's weights (data-free).

    The sum of the magnitude scores of all the unit's weights."""
    return _per_member(units, ctx, lambda s, k: _element("magnitude", s).flatten(1).sum(1))


@register("random")
def random(units: list[tuple[Member, ...]], ctx: ScoreContext) -> Tensor:
    """Seeded random unit scores: the control."""
    return uniform_scores(len(units), ctx.generator, ctx.zeros(0))


@register("taylor", needs=("grads",), paper="Molchanov et al. 2019, Importance Estimation for Neural Network Pruning")
def taylor(units: list[tuple[Member, ...]], ctx: ScoreContext) -> Tensor:
    """First-order Taylor loss change of the whole unit.

    ``(sum over the unit of w * dL/dw)^2``; the group form as in LLM-Pruner (Ma et al. 2023)."""
    total = ctx.zeros(len(units))
    for k, m in enumerate(units[0]):
        g = ctx.grads.get(m.param)
        if g is None:
            continue
        w = member_slices(ctx.tensor(m.param).float(), units, k)
        total += first_order(w, member_slices(g.float(), units, k)).flatten(1).sum(1)
    return total.pow(2)


@register("llm_pruner", needs=("grads", "fisher"),
          paper="Ma et al. 2023, LLM-Pruner: On the Structural Pruning of Large Language Models (LLM-Pruner)")
def llm_pruner(units: list[tuple[Member, ...]], ctx: ScoreContext) -> Tensor:
    """Taylor importance, first + second order, summed.

    Each weight's estimated loss change when it is zeroed, ``|g w - 1/2 F w^2|``, with ``g``
    the gradient of the summed calibration loss and ``F`` the diagonal empirical Fisher
    ``sum_n g_n^2`` (per sample) standing for the Hessian's diagonal, as in Ma et al. 2023;
    the group's importance is the sum over every weight of every coupled member (their
    element-wise, sum-aggregated variant)."""
    total = ctx.zeros(len(units))
    for k, m in enumerate(units[0]):
        g, f = ctx.grads.get(m.param), ctx.fisher.get(m.param)
        if g is None or f is None:
            continue
        w = member_slices(ctx.tensor(m.param).float(), units, k)  # (units, L, *rest)
        g, f = member_slices(g.float(), units, k), member_slices(f.float(), units, k)
        total += (first_order(w, g) - 0.5 * f * w.square()).abs().flatten(1).sum(1)
    return total


def _is_bn_weight(m: Member, ctx: ScoreContext) -> bool:
    return m.param.endswith(".weight") and isinstance(ctx.module(m.param), nn.modules.batchnorm._BatchNorm)


@register("bn_scale", structures=frozenset({"channels"}),
          paper="Liu et al. 2017, Learning Efficient Convolutional Networks through Network Slimming")
def bn_scale(units: list[tuple[Member, ...]], ctx: ScoreContext) -> Tensor:
    """|gamma| of the BatchNorm scales (CNN channels)."""
    if not any(_is_bn_weight(m, ctx) for m in units[0]):
        raise ConfigError("bn_scale needs BatchNorm layers in every pruned group; use l2 or taylor for this model")
    return _per_member(units, ctx, lambda s, k: s.abs().flatten(1).sum(1), _is_bn_weight)


def input_dim(m: Member, ctx: ScoreContext) -> bool:
    """Whether the member is the input-feature dim of a Linear/Conv weight (a consumer)."""
    if not m.param.endswith(".weight"):
        return False
    mod = ctx.module(m.param)
    if type(mod).__name__ == "Conv1D":
        return m.dim == 0
    if isinstance(mod, nn.modules.conv._ConvNd):
        return m.dim == 1 and mod.groups == 1 and not isinstance(mod, nn.modules.conv._ConvTransposeNd)
    return isinstance(mod, nn.Linear) and m.dim == 1


def _consumer_score(units: list[tuple[Member, ...]], ctx: ScoreContext,
                    per_input: Callable[[Tensor, InputStats], Tensor]) -> Tensor:
    """Sum over the unit's consumer members of ``per_input(|W| columns, moments)[j]``."""
    if not ctx.moments:
        raise ConfigError("activation scores need input statistics: pass calibration data (--calib TEXT or data=...)")
    total = ctx.zeros(len(units))
    found = False
    for k, m in enumerate(units[0]):
        if not input_dim(m, ctx) or m.param not in ctx.moments:
            continue
        found = True
        w = ctx.tensor(m.param).float().movedim(m.dim, 0).flatten(1)  # (in, out * kernel)
        values = per_input(w, ctx.moments[m.param]).to(total)  # (in,)
        total += values[torch.tensor([u[k].index for u in units], device=values.device)].sum(1)
    if not found:
        raise ConfigError("this activation score needs a Linear/Conv that consumes the pruned units")
    return total


@register("wanda", needs=("inputs",),
          paper="Sun et al. 2024, A Simple and Effective Pruning Approach for Large Language Models (Wanda)")
def wanda(units: list[tuple[Member, ...]], ctx: ScoreContext) -> Tensor:
    """Structured Wanda: input norms x weight magnitudes.

    ``sum_j ||x_j||_2 * sum_i |W_ij|`` over the unit's input features of the layers
    consuming it (the structured variant of Wanda)."""
    return _consumer_score(units, ctx, lambda w, mom: _element("wanda", w.t(), input_norm=mom.input_norm).sum(0))


@register("flap", needs=("inputs",),
          paper="An et al. 2024, Fluctuation-based Adaptive Structured Pruning for Large Language Models (FLAP)")
def flap(units: list[tuple[Member, ...]], ctx: ScoreContext) -> Tensor:
    """Fluctuation: input variance x weight norm^2.

    ``sum_j Var(x_j) * ||W_:,j||^2``. With bias compensation the removed inputs' mean
    contribution is folded into the consumer's bias."""
    return _consumer_score(units, ctx, lambda w, mom: w.pow(2).sum(1) * mom.variance.to(w))

"""What every training-time schedule shares: the context it sees, the protocol a controller
drives, and the one function that turns per-parameter scores into masks through the
existing allocation and pattern axes.

Masks are boolean, True = pruned, shaped like the parameter (convolutions included); scores
and patterns see the ``(out, in * prod(kernel))`` view.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Protocol, Sequence

import torch
from torch import Tensor

from ..allocation import ALLOCATIONS, LayerRef
from ..config import Allocation, Pattern
from ..errors import ScheduleError
from ..masking import as_2d
from ..patterns import MaskSpec, check_nm_shape
from ..rounding import count

Masks = dict[str, Tensor]
if TYPE_CHECKING:
    from ..structural.graph import Member

    Unit = tuple[Member, ...]
else:
    Unit = tuple


@dataclass
class PruneContext:
    """What a schedule may read when it updates masks: the live ``weights``, the current
    ``masks``, dense gradients of the last backward (only when the schedule asked for them),
    and the controller's seeded ``generator``."""

    weights: Mapping[str, Tensor]
    masks: Mapping[str, Tensor]
    generator: torch.Generator
    dense_grads: Mapping[str, Tensor] = field(default_factory=dict)
    units: Sequence[Sequence[Unit]] = ()  # structural groups of coupled units, for channels=True
    transposed: frozenset[str] = frozenset()  # weights stored (in, out): transformers Conv1D
    input_norms: Mapping[str, Tensor] = field(default_factory=dict)  # (in,) since the last pruning event

    def scores(self, score: str) -> dict[str, Tensor]:
        """Element scores of the live weights (:func:`element_scores`) from what this context holds."""
        needs = check_training_score(score)
        missing = [n for n in self.weights if ("input_norm" in needs and n not in self.input_norms)
                   or ("grad" in needs and n not in self.dense_grads)]
        if missing:
            raise ScheduleError(f"score {score!r} reads what training steps produce ({', '.join(sorted(needs))}), but "
                                f"none was seen for {missing[0]} before this pruning event; start pruning after at "
                                "least one training step (start >= 1)")
        return element_scores(score, self.weights, generator=self.generator, transposed=self.transposed,
                              input_norms=self.input_norms, grads=self.dense_grads)


class TrainingSchedule(Protocol):
    """Driven by :class:`prunekit.training.SparsityController`. ``step`` counts completed
    optimizer steps: ``initial_masks`` runs at attach time (step 0), ``update`` after every
    step; either returns new masks or None (keep the current ones)."""

    def initial_masks(self, ctx: PruneContext) -> Masks | None: ...

    def update(self, step: int, ctx: PruneContext) -> Masks | None: ...

    def needs_dense_grads(self, step: int) -> bool: ...

    def sparsity_at(self, step: int) -> float: ...


def check_training_score(score: str) -> frozenset[str]:
    """An element score a training schedule can compute: its statistics (input norms, dense
    gradients) are gathered during training steps; a Hessian is not. Returns what it needs."""
    from ..scoring import SCORES

    needs = SCORES.get(score).needs
    if "hessian" in needs:
        raise ScheduleError(f"score {score!r} needs the layer Hessian, which training does not gather; use it "
                            "in one-shot pruning, or train with magnitude, wanda, taylor or random")
    if "grad_l2" in needs:
        raise ScheduleError(f"score {score!r} needs per-sample gradient norms over calibration data, which training "
                            "steps do not gather; use it in one-shot pruning, or train with magnitude, wanda, "
                            "taylor or random")
    return needs


def check_target(target: float, what: str = "target sparsity") -> None:
    """Raise :class:`ScheduleError` unless ``0 <= target < 1``."""
    if not isinstance(target, (int, float)) or math.isnan(target) or not (0.0 <= target < 1.0):
        raise ScheduleError(
            f"{what} {target!r} is outside [0, 1): it is the fraction of weights removed, e.g. 0.9"
        )


def check_pattern_target(pattern: Pattern, target: float) -> None:
    """An N:M pattern fixes the final sparsity at 1 - N/M."""
    if pattern.kind == "nm" and abs(target - pattern.sparsity) > 1e-9:
        raise ScheduleError(
            f"pattern {pattern} ends at sparsity {pattern.sparsity:g}, but target {target:g} was asked for; "
            f"set target={pattern.sparsity:g}"
        )


def nm_keep(sparsity: float, pattern: Pattern) -> int:
    """Weights kept per group of M at an intermediate ``sparsity`` of an N:M schedule: the
    sparsity rounded down to the 1/M grid, never fewer than N kept."""
    return max(pattern.n, pattern.m - math.floor(sparsity * pattern.m + 1e-9))


def realised_sparsity(sparsity: float, pattern: Pattern) -> float:
    """The sparsity a pattern actually reaches when ``sparsity`` is asked for."""
    if pattern.kind == "nm":
        return 1.0 - nm_keep(sparsity, pattern) / pattern.m
    return sparsity


def select_masks(scores: Mapping[str, Tensor], sparsity: float, *, allocation: str = "uniform",
                 pattern: Pattern = Pattern(), keep_pruned: Mapping[str, Tensor] | None = None,
                 channels: bool = False, units: Sequence[Sequence[Unit]] = (),
                 transposed: frozenset[str] = frozenset()) -> Masks:
    """Masks (True = pruned) pruning the lowest ``scores`` to overall ``sparsity``.

    Unstructured: ``allocation`` (any ALLOCATIONS entry: uniform, global, global_min, erk...)
    gives per-layer amounts, and each layer prunes its lowest scores (per ``row`` if the
    pattern says so, else over the layer). N:M: every layer keeps :func:`nm_keep` of every M
    (N:M fixes each layer's sparsity, so ``allocation`` is not used).
    ``channels``: prune whole output channels (rows of the ``(out, in * kernel)`` view) ranked
    by the L2 norm of their scores; ``sparsity`` is then the fraction of channels (equal to the
    fraction of weights under uniform allocation). Masks only: physical removal of channels
    is :mod:`prunekit.structural`'s job.
    ``units``: with ``channels``, groups of coupled units from the structural graph
    (:func:`prunekit.structural.build_graph`): whole units are masked in every weight they
    span (a conv's filter and the next layer's input channel), ``sparsity`` of each group,
    so that :func:`prunekit.structural.remove_masked_units` can later remove them exactly.
    ``keep_pruned``: masks whose pruned positions must stay pruned (their scores are pushed
    below every other score), so gradual and iterative pruning only ever remove more.
    ``transposed``: names of weights stored ``(in, out)`` (transformers ``Conv1D``): their
    rows, N:M groups and channels are taken along the right dims.
    """
    if channels and units:
        return unit_masks(scores, sparsity, units, keep_pruned or {})
    if transposed:
        turn = lambda d: {n: (t.t() if n in transposed else t) for n, t in d.items()}  # noqa: E731
        masks = select_masks(turn(scores), sparsity, allocation=allocation, pattern=pattern,
                             keep_pruned=turn(keep_pruned or {}), channels=channels)
        return turn(masks)
    flat = {n: as_2d(s.detach().float()) for n, s in scores.items()}  # each (out, in * kernel)
    pruned_before = {n: as_2d(m) for n, m in (keep_pruned or {}).items() if n in flat}
    if channels:
        if pattern.kind == "nm":
            raise ScheduleError("channel pruning and an N:M pattern exclude each other; choose one")
        flat = {n: s2.norm(dim=1, keepdim=True) for n, s2 in flat.items()}  # (out, 1)
        pruned_before = {n: m.all(dim=1, keepdim=True) for n, m in pruned_before.items()}
    if pruned_before:
        floor = min(float(s2.min()) for s2 in flat.values()) - 1.0
        flat = {n: s2.masked_fill(pruned_before[n], floor) if n in pruned_before else s2 for n, s2 in flat.items()}
    if pattern.kind == "nm":
        keep = nm_keep(sparsity, pattern)
        out = {}
        for name, s2 in flat.items():
            check_nm_shape(s2.shape[1], pattern.m, name)
            out[name] = (MaskSpec("nm", n=keep, m=pattern.m).mask(s2) if keep < pattern.m
                         else torch.zeros_like(s2, dtype=torch.bool))
        return {n: m.view(scores[n].shape) for n, m in out.items()}
    refs = [LayerRef(n, i, s2.numel(), (lambda s2=s2: s2), None if channels else tuple(scores[n].shape))
            for i, (n, s2) in enumerate(flat.items())]
    amounts = ALLOCATIONS.get(allocation)(refs, sparsity, Allocation(allocation))
    group = "layer" if channels else (pattern.group or "layer")
    masks = {n: MaskSpec("unstructured", a, group).mask(s2) for (n, s2), a in zip(flat.items(), amounts)}
    return {n: m.expand(as_2d(scores[n]).shape).reshape(scores[n].shape) for n, m in masks.items()}


def unit_masks(scores: Mapping[str, Tensor], sparsity: float, groups: Sequence[Sequence[Unit]],
               keep_pruned: Mapping[str, Tensor]) -> Masks:
    """Mask the lowest-scoring ``sparsity`` of each group's units (score: sum of squared
    member scores over the masked weights); fully masked units stay masked."""
    masks = {n: torch.zeros(s.shape, dtype=torch.bool, device=s.device) for n, s in scores.items()}
    for units in groups:
        value = torch.zeros(len(units))
        done = torch.zeros(len(units), dtype=torch.bool)
        for u, unit in enumerate(units):
            inside = [m for m in unit if m.param in scores]
            idx = [torch.tensor(m.index, device=scores[m.param].device) for m in inside]
            value[u] = sum(float(scores[m.param].index_select(m.dim, i).float().pow(2).sum()) for m, i in zip(inside, idx))
            old = [keep_pruned[m.param].index_select(m.dim, i) for m, i in zip(inside, idx) if m.param in keep_pruned]
            done[u] = bool(old) and all(bool(o.all()) for o in old)
        k = min(count(sparsity, len(units)), len(units) - 1)
        value[done] = -1.0  # already removed: stays removed, ranked first
        for u in torch.argsort(value, stable=True)[:k].tolist():
            for m in units[u]:
                if m.param in masks:
                    masks[m.param].index_fill_(m.dim, torch.tensor(m.index, device=masks[m.param].device), True)
    return masks


def element_scores(score: str, weights: Mapping[str, Tensor], *, generator: torch.Generator | None = None,
                   transposed: frozenset[str] = frozenset(), input_norms: Mapping[str, Tensor] | None = None,
                   grads: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Scores of every weight by the element score ``score`` (:data:`prunekit.scoring.SCORES`,
    the same functions one-shot pruning uses), shaped like each weight. Scores see the
    ``(out, in * kernel)`` view; ``input_norms[name]`` (``(in,)``) and ``grads[name]`` (shaped
    like the weight) feed the scores that need them (Wanda, Taylor)."""
    from ..scoring import SCORES, LayerStats

    entry = SCORES.get(score)
    out = {}
    for name, w in weights.items():
        w2 = w.detach().t() if name in transposed else as_2d(w.detach())  # (out, in * kernel)
        g = (grads or {}).get(name)
        g2 = None if g is None else (g.t() if name in transposed else as_2d(g))
        norm = (input_norms or {}).get(name)
        if "input_norm" in entry.needs and norm is not None and norm.numel() != w2.shape[1]:
            raise ScheduleError(f"score {score!r} needs one input norm per input column of {name}; "
                                "it works on Linear and Conv1D layers, not convolutions")
        s2 = entry(w2, LayerStats(input_norm=norm, generator=generator, grad=g2))
        out[name] = s2.t() if name in transposed else s2.reshape(w.shape)
    return out


def magnitudes(weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return element_scores("magnitude", weights)


def random_scores(weights: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
    return element_scores("random", weights, generator=generator)


def shuffle_masks(masks: Mapping[str, Tensor], generator: torch.Generator) -> Masks:
    """Layerwise shuffle (Frankle et al. 2021, "Pruning Neural Networks at Initialization: Why
    are We Missing the Mark?"): each layer's pruned positions are permuted at random, keeping
    only its sparsity. The control that tells whether a method found *which* weights matter
    or only *how many* per layer. An N:M mask does not stay N:M."""
    out = {}
    for name, mask in masks.items():
        perm = torch.randperm(mask.numel(), generator=generator).to(mask.device)  # (numel,)
        out[name] = mask.reshape(-1)[perm].view(mask.shape)
    return out


def overall_sparsity(masks: Mapping[str, Tensor]) -> float:
    return sum(int(m.sum()) for m in masks.values()) / max(1, sum(m.numel() for m in masks.values()))


__all__ = ["PruneContext", "TrainingSchedule", "Masks", "select_masks", "unit_masks", "shuffle_masks", "check_target",
           "check_pattern_target", "nm_keep", "realised_sparsity", "magnitudes", "random_scores", "element_scores",
           "overall_sparsity"]

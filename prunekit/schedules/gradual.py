"""Gradual magnitude pruning with the cubic schedule of Zhu & Gupta 2017 ("To prune, or not to
prune: exploring the efficacy of pruning for model compression"):

    s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (t_end - t_0))**3,

applied every ``frequency`` steps for t in [t_0, t_end] (and at t_end itself): prune fast
while the network is redundant, slowly as it nears the target. Already-pruned weights stay
pruned. With an N:M pattern the sparsity moves along the 1/M grid (keeping M-1, M-2, ... of
every M) down to N.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..config import Pattern
from ..errors import ScheduleError
from .base import (Masks, PruneContext, check_pattern_target, check_target, check_training_score,
                   realised_sparsity, select_masks)


@dataclass(frozen=True)
class Gradual:
    """Zhu & Gupta's gradual magnitude pruning; also a schedule a controller can drive.

    ``target``: final sparsity s_f; ``start``/``end``: first and last pruning step (t_0,
    t_end); ``frequency``: steps between pruning events (Δt); ``initial``: s_i at t_0;
    ``allocation``: per-layer amounts (uniform, global, global_min, erk...); ``pattern``:
    unstructured or N:M; ``channels``: prune whole output channels by L2 norm instead of
    single weights (structured variant, masks only); ``score``: any element score training
    can compute (``magnitude``, ``wanda`` from input norms seen since the last pruning event,
    ``taylor`` from the dense gradient of the step before it, ``random``).
    """

    target: float
    start: int = 0
    end: int = 1000
    frequency: int = 100
    initial: float = 0.0
    allocation: str = "uniform"
    pattern: Pattern = field(default_factory=Pattern)
    channels: bool = False
    score: str = "magnitude"

    def __post_init__(self) -> None:
        check_training_score(self.score)
        check_target(self.target)
        check_target(self.initial, "initial sparsity")
        check_pattern_target(self.pattern, self.target)
        if self.channels and self.pattern.kind == "nm":
            raise ScheduleError("channels=True and an N:M pattern exclude each other; choose one")
        if self.start < 0:
            raise ScheduleError(f"start step {self.start} is negative; use start >= 0")
        if self.end < self.start:
            raise ScheduleError(
                f"schedule end {self.end} precedes its start {self.start}; set end >= start "
                "(end == start prunes once, at that step)"
            )
        if self.frequency < 1:
            raise ScheduleError(f"frequency {self.frequency} must be >= 1 step between pruning events")
        if self.initial > self.target:
            raise ScheduleError(f"initial sparsity {self.initial} exceeds the target {self.target}; swap them")

    def is_event(self, step: int) -> bool:
        """Whether the schedule prunes after ``step`` optimizer steps."""
        if not self.start <= step <= self.end:
            return False
        return (step - self.start) % self.frequency == 0 or step == self.end

    def sparsity_at(self, step: int) -> float:
        """The cubic formula at the last pruning event at or before ``step`` (0 before t_0)."""
        if step < self.start:
            return 0.0
        if step >= self.end or self.end == self.start:
            return self.target
        last = self.start + (step - self.start) // self.frequency * self.frequency
        progress = (last - self.start) / (self.end - self.start)
        return self.target + (self.initial - self.target) * (1.0 - progress) ** 3

    def realised_at(self, step: int) -> float:
        """The sparsity the masks reach at ``step`` (the formula, on the 1/M grid for N:M)."""
        return realised_sparsity(self.sparsity_at(step), self.pattern)

    def needs_dense_grads(self, step: int) -> bool:
        return "grad" in check_training_score(self.score) and self.is_event(step)

    def needs_input_norms(self) -> bool:
        return "input_norm" in check_training_score(self.score)

    def initial_masks(self, ctx: PruneContext) -> Masks | None:
        return self.update(0, ctx)

    def update(self, step: int, ctx: PruneContext) -> Masks | None:
        if not self.is_event(step) or self.sparsity_at(step) == 0.0:
            return None
        return select_masks(ctx.scores(self.score), self.sparsity_at(step), allocation=self.allocation,
                            pattern=self.pattern, keep_pruned=ctx.masks, channels=self.channels,
                            units=ctx.units, transposed=ctx.transposed)

"""Look before you leap: what a recipe would do to a model, without changing or writing anything.

:func:`plan` sizes every stage the way the real run will (same groups, same counts, same
rounding) and returns a :class:`Plan`: per stage, which layers or groups lose how much, and the
resulting parameters, nonzeros and MACs. Which units go is decided by scores at run time, so
the plan computes no statistics: structure stages run with ``plan=True`` on a copy of the model
(the first units of each group stand in for the chosen ones; sizes do not depend on which),
weights stages take their per-layer amounts from the allocation wherever it needs no data.
As Torch-Pruning's interactive mode, but before any work and for every stage kind.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .rounding import count
from .summary import human


@dataclass(frozen=True)
class Row:
    """One layer (weights) or group (structure): ``removed`` of ``before`` weights or units."""

    name: str
    before: int
    removed: int
    unit: str  # "weights", "neurons", "heads", ...

    @property
    def after(self) -> int:
        return self.before - self.removed


@dataclass(frozen=True)
class StagePlan:
    stage: int
    kind: str
    summary: str
    params_before: int
    params_after: int
    nonzero_before: int
    nonzero_after: int
    macs_before: int | None = None
    macs_after: int | None = None
    rows: tuple[Row, ...] = ()
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    """What a recipe would do: one :class:`StagePlan` per stage; ``str(plan)`` is the table
    ``--dry-run`` prints."""

    stages: tuple[StagePlan, ...]
    model: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def params_before(self) -> int:
        return self.stages[0].params_before

    @property
    def params_after(self) -> int:
        return self.stages[-1].params_after

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "params_before": self.params_before, "params_after": self.params_after,
                "stages": [{**asdict(s), "rows": [{**asdict(r), "after": r.after} for r in s.rows]}
                           for s in self.stages]}

    def __str__(self) -> str:
        return format_plan(self)


def plan(recipe: Any, model: nn.Module | str, data: Any = None, *, tokenizer: Any = None) -> Plan:
    """The :class:`Plan` of ``recipe`` (a Recipe, YAML path or dict) on ``model`` (an
    nn.Module or a MODEL spec); ``model`` is left unchanged. ``data``: calibration data (only
    one example is used, to trace the model) instead of the recipe's text."""
    from .api import load
    from .calibration import CalibrationData, as_calibration
    from .pipeline import check, measure
    from .recipe import Recipe, stage_kind

    recipe = recipe if isinstance(recipe, Recipe) else \
        Recipe.from_dict(recipe) if isinstance(recipe, dict) else Recipe.from_yaml(recipe)
    name = model if isinstance(model, str) else type(model).__name__
    if isinstance(model, str):
        loaded = load(model)
        model, tokenizer = loaded.model, tokenizer or loaded.tokenizer
    check(recipe, model)
    c = recipe.calibration
    if data is not None:
        example = as_calibration(data, c.batch_size, tokenizer=tokenizer, nsamples=c.nsamples, seqlen=c.seqlen,
                                 seed=c.seed).trace_inputs(model)
    elif tokenizer is not None:
        example = CalibrationData.from_text(tokenizer, c.text, 1, c.seqlen, c.seed, 1).trace_inputs(model)
    else:
        example = None
    kinds = [stage_kind(s) for s in recipe.stages]
    shadow = copy.deepcopy(model) if {"structure", "budget"} & set(kinds) else model  # structure plans resize the copy
    macs = _macs(shadow, example)
    stages = []
    for i, (stage, kind) in enumerate(zip(recipe.stages, kinds), start=1):
        before = measure(shadow)
        sp = PLANNERS[kind](i, stage, shadow, example, before, macs)
        macs = sp.macs_after
        stages.append(sp)
    return Plan(tuple(stages), name)


def _macs(model: nn.Module, example: Any) -> int | None:
    from .evaluate.macs import count_macs

    return count_macs(model, example) if example is not None else None


def _structure(i: int, stage: Any, model: nn.Module, example: Any, before: dict, macs: int | None) -> StagePlan:
    from .errors import ConfigError
    from .pipeline import measure
    from .structural import prune_structure

    if example is None:
        raise ConfigError("planning a structure stage traces the model: pass data=... or a model with a tokenizer")
    cfg = stage.resolved(model)
    report = prune_structure(model, cfg, example_inputs=example, plan=True).report
    unit = "blocks" if cfg.structure == "layers" else cfg.structure
    unit = "query heads" if cfg.structure == "heads" and cfg.heads == "query" else unit
    rows = tuple(Row(g["name"], g["units_before"], g["removed"], unit) for g in report["groups"])
    notes = [f"which units go is decided at run time by {cfg.method!r} scores"
             + (" from calibration data" if cfg.method != "random" else "")]
    if cfg.allocation != "uniform" and cfg.structure not in ("layers", "experts"):
        notes.append(f"{cfg.allocation} allocation: per-group counts depend on the scores; the total is exact")
    after = measure(model)
    summary = (f"structure: remove {cfg.structure} (ratio {cfg.ratio}, {cfg.method}): {report['units_removed']} of "
               f"{report['units_before']} units ({report['ratio_achieved']:.1%})")
    return StagePlan(i, "structure", summary, before["params_total"], after["params_total"],
                     before["params_nonzero"], after["params_nonzero"], report["macs_before"], report["macs_after"],
                     rows, tuple(notes))


def _budget(i: int, stage: Any, model: nn.Module, example: Any, before: dict, macs: int | None) -> StagePlan:
    from .errors import ConfigError
    from .pipeline import measure
    from .structural.budget import plan_budget

    if example is None:
        raise ConfigError("planning a budget stage traces the model: pass data=... or a model with a tokenizer")
    reports, notes = plan_budget(stage, model, example)
    rows = tuple(Row(g["name"], g["units_before"], g["removed"], g["kind"]) for r in reports for g in r["groups"])
    after = measure(model)
    target = next(f"{k[7:]} {getattr(stage, k):,}" for k in ("target_params", "target_macs")
                  if getattr(stage, k) is not None)
    summary = f"budget: {', '.join(stage.structures)} to {target}"
    return StagePlan(i, "budget", summary, before["params_total"], after["params_total"], before["params_nonzero"],
                     after["params_nonzero"], reports[0]["macs_before"] if reports else macs,
                     reports[-1]["macs_after"] if reports else macs, rows, tuple(notes))


def _weights(i: int, stage: Any, model: nn.Module, example: Any, before: dict, macs: int | None) -> StagePlan:
    from .allocation import ALLOCATIONS
    from .schedules.oneshot import allocate, make_plan
    from .scoring import SCORES

    p = make_plan(model, stage)
    rule = ALLOCATIONS.get(stage.allocation.name)
    data_free = not (rule.uses_scores and SCORES.get(p.score.allocation_proxy).needs)
    amounts = allocate(model, p, None, False) if data_free else {n: stage.sparsity for n in p.all_layers}
    nm = stage.pattern.kind == "nm"
    rows, new_zeros = [], 0
    for name, target in p.all_layers.items():
        w = target.weight()
        n = w.numel()
        removed = n // stage.pattern.m * (stage.pattern.m - stage.pattern.n) if nm else count(amounts[name], n)
        rows.append(Row(name, n, removed, "weights"))
        new_zeros += max(removed - (n - int(torch.count_nonzero(w))), 0)  # weights already zero go first
    zeros = sum(r.removed for r in rows)
    notes = ["sparse weights keep the dense shapes: MACs are unchanged for dense kernels"
             + (f"; {stage.pattern} kernels skip {stage.pattern.n}/{stage.pattern.m} of them" if nm else "")]
    if not data_free:
        notes.append(f"{stage.allocation.name} allocation sets per-layer amounts from calibration data at run time; "
                     f"shown at the target {stage.sparsity}")
    of = sum(r.before for r in rows)
    summary = (f"weights: {stage.method} {stage.pattern}, sparsity {stage.sparsity} ({stage.allocation.name}): "
               f"{zeros:,} of {of:,} weights in {len(rows)} layers ({zeros / max(of, 1):.1%})")
    return StagePlan(i, "weights", summary, before["params_total"], before["params_total"], before["params_nonzero"],
                     before["params_nonzero"] - new_zeros, macs, macs, tuple(rows), tuple(notes))


def _training(i: int, stage: Any, model: nn.Module, example: Any, before: dict, macs: int | None) -> StagePlan:
    n = before["pruned_layers_params"]
    zeros = count(stage.sparsity, n)
    new = max(zeros - round(before["sparsity"] * n), 0)  # weights already zero count toward the target
    summary = (f"training: gradual pruning to {stage.sparsity} ({stage.pattern}, {stage.allocation}) over "
               f"{stage.steps} steps, every {stage.frequency}: {zeros:,} of {n:,} weights zero at the end")
    return StagePlan(i, "training", summary, before["params_total"], before["params_total"], before["params_nonzero"],
                     before["params_nonzero"] - new, macs, macs)


def _recovery(i: int, stage: Any, model: nn.Module, example: Any, before: dict, macs: int | None) -> StagePlan:
    how = "distilling from the unpruned model" if stage.distill is not None else "next-token loss"
    summary = (f"recovery: {stage.method}, {stage.steps} steps at lr {stage.lr}, {how}; masks kept, "
               "sizes unchanged")
    return StagePlan(i, "recovery", summary, before["params_total"], before["params_total"], before["params_nonzero"],
                     before["params_nonzero"], macs, macs)


def _tokens(i: int, stage: Any, model: nn.Module, example: Any, before: dict, macs: int | None) -> StagePlan:
    if stage.decoder or stage.after is not None:
        how = f"prompts cut to {stage.keep:g} of their tokens after {stage.cut_after} layers"
    else:
        amount = f"keep {stage.keep:g}" if stage.keep is not None else f"r {stage.r}" if stage.r is not None \
            else f"schedule {list(stage.schedule)}"
        how = f"{amount} per reducing layer"
    summary = f"tokens: {stage.method}, {how}; applied at inference by hooks, weights unchanged"
    notes = ("the MACs saved depend on each input's length; the run measures them, and latency, on the calibration "
             "text",)
    return StagePlan(i, "tokens", summary, before["params_total"], before["params_total"], before["params_nonzero"],
                     before["params_nonzero"], macs, macs, notes=notes)


PLANNERS = {"structure": _structure, "budget": _budget, "weights": _weights, "training": _training,
            "recovery": _recovery, "tokens": _tokens}


def format_plan(p: Plan, max_rows: int = 12) -> str:
    """The plan as text: per stage its summary, the rows (identical rows folded), sizes, notes."""
    lines = [f"plan for {p.model} (nothing is changed or written):"]
    for s in p.stages:
        lines.append(f"  {s.stage}. {s.summary}")
        folded = _fold(s.rows)
        for label, r, n in folded[:max_rows]:
            lines.append(f"       {label:<44} {r.before:>12,} -> {r.after:>12,} {r.unit}  (-{r.removed:,}"
                         f"{', x' + str(n) if n > 1 else ''})")
        if len(folded) > max_rows:
            lines.append(f"       ... {len(folded) - max_rows} more")
        lines.append(f"     params {human(s.params_before)} -> {human(s.params_after)}, nonzero {human(s.nonzero_before)}"
                     f" -> {human(s.nonzero_after)}, MACs {human(s.macs_before)} -> {human(s.macs_after)}")
        lines.extend(f"     note: {n}" for n in s.notes)
    return "\n".join(lines)


def _fold(rows: tuple[Row, ...]) -> list[tuple[str, Row, int]]:
    """Rows equal but for their layer index fold into one ``layers.*.x`` row (first order kept)."""
    import re

    out: dict[tuple[str, int, int], list[Row]] = {}
    for r in rows:
        out.setdefault((re.sub(r"\.\d+(\.|$)", r".*\1", r.name), r.before, r.removed), []).append(r)
    return [(label if len(rs) > 1 else rs[0].name, rs[0], len(rs)) for (label, _, _), rs in out.items()]

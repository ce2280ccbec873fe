"""Prune to a budget: the numbers of neurons, heads and blocks (optionally hidden width) that
meet a parameter, MAC or latency target with the least loss on calibration data.

The search (Minitron's recipe, Muralidharan et al. 2024 / Sreenivas et al. 2024, for plain
Hugging Face models): exact plans size every structure (:mod:`prunekit.allocation.budget`
turns two plans each into a cost model), every *mix* of structures is solved for the least
removal that meets the budget, each distinct candidate is pruned on a copy with real scores
from a slice of the calibration data and ranked by its loss on held-out calibration windows,
and the best one is applied to the model with the full calibration set. Widths are kept at a
multiple measured to run fast on the device (:func:`~prunekit.evaluate.latency.fast_multiple`).
A latency target is met through MACs: the MAC budget is rescaled by measured latency until the
chosen candidate's prefill is at most the target.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..allocation.budget import ORDER, Cost, affine, estimate, label, levels, mixes, solve
from ..errors import ConfigError
from .config import StructureConfig

log = logging.getLogger(__name__)

UNIT_STRUCTURES = ("neurons", "heads", "width")
TARGETS = ("target_params", "target_macs", "target_latency_ms")


@dataclass(frozen=True)
class BudgetStage:
    """Structural pruning to a size budget (exactly one of ``target_params``, ``target_macs``:
    multiply-accumulates of one forward over a 1 x 64-token window, as structure stages report
    them; ``target_latency_ms``: prefill of one calibration window on the run's device).

    ``structures``: what may shrink (neurons, heads, layers, width). ``method``: the unit score
    (None: FLAP on language models); ``layer_method``: the block score. ``round_to``: neuron and
    width counts keep a multiple of this; ``"auto"`` measures it on the device. ``candidates``:
    how many mixes of structures to try. ``search_samples``: calibration windows that score each
    candidate; ``eval_samples``: the last windows, on which candidates' losses are compared.
    """

    structures: tuple[str, ...] = ("neurons", "heads", "layers")
    target_params: int | None = None
    target_macs: int | None = None
    target_latency_ms: float | None = None
    method: str | None = None
    layer_method: str = "block_influence"
    heads: str = "auto"
    round_to: int | str = "auto"
    candidates: int = 8
    search_samples: int = 8
    eval_samples: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        structures = (self.structures,) if isinstance(self.structures, str) else tuple(self.structures)
        structures = tuple(s.strip() for part in structures for s in str(part).split(",") if s.strip())
        bad = [s for s in structures if s not in ORDER]
        if bad or not structures:
            raise ConfigError(f"budget: structures {list(structures)} must be some of {', '.join(ORDER)}")
        if len(set(structures)) != len(structures):
            raise ConfigError(f"budget: structures {list(structures)} name one twice")
        object.__setattr__(self, "structures", tuple(s for s in ORDER if s in structures))
        given = [t for t in TARGETS if getattr(self, t) is not None]
        if len(given) != 1:
            raise ConfigError("budget: give exactly one of target_params, target_macs, target_latency_ms "
                              f"(--target-params N, --target-macs N, --target-latency MS); got {given or 'none'}")
        value = getattr(self, given[0])
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"budget: {given[0]} must be a positive number, got {value!r}")
        if self.round_to != "auto" and (isinstance(self.round_to, bool) or not isinstance(self.round_to, int)
                                        or self.round_to < 1):
            raise ConfigError(f"budget: round_to {self.round_to!r} must be 'auto' or an integer >= 1")
        for name in ("candidates", "search_samples", "eval_samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"budget: {name} must be an integer >= 1, got {v!r}")
        if self.method is not None:
            object.__setattr__(self, "method", str(self.method).replace("-", "_"))
        StructureConfig(structure="neurons", ratio=0.0, method=self.method, heads=self.heads)  # checks heads

    @property
    def metric(self) -> str:
        return "params" if self.target_params is not None else "macs"

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["structures"] = list(self.structures)
        return {k: v for k, v in out.items() if v is not None or k in ("method",)}

    def structure(self, s: str, ratio: float, round_to: int, model: nn.Module) -> StructureConfig:
        method = self.layer_method if s == "layers" else self.method
        cfg = StructureConfig(structure=s, ratio=ratio, method=method, seed=self.seed,
                              heads=self.heads if s == "heads" else "auto",
                              round_to=round_to if s in ("neurons", "width") else 1)
        return cfg.resolved(model)


def _plan(model: nn.Module, cfg: StructureConfig, example: Any) -> dict[str, Any]:
    from .prune import prune_structure

    return prune_structure(copy.deepcopy(model), cfg, example_inputs=example, plan=True).report


def _group_size(report: dict[str, Any]) -> int:
    g = report["groups"][0]
    return int(g.get("choices", g["units_before"]))


def costs(stage: BudgetStage, model: nn.Module, example: Any, step: int) -> dict[str, Cost]:
    """The cost model of every structure, from two exact plans each (fewest and most units)."""
    out = {}
    for s in stage.structures:
        try:  # one plan only to read the group size
            n = _group_size(_plan(model, stage.structure(s, 0.5, 1, model), example))
        except ConfigError as exc:
            raise ConfigError(f"budget: {s} cannot shrink on this model ({exc}); drop {s} from the structures") from None
        allowed = levels(n, step if s in ("neurons", "width") else 1)
        if len(allowed) < 2:
            raise ConfigError(f"budget: {s} cannot shrink: groups of {n} units at a multiple of {step} keep "
                              f"all of them; lower round_to or drop {s} from the structures")
        ends = [allowed[1], allowed[-1]]
        reps = [_plan(model, stage.structure(s, k / n, step, model), example) for k in ends]
        p = [r["params_before"] - r["params_after"] for r in reps]
        m = [(r["macs_before"] or 0) - (r["macs_after"] or 0) for r in reps]
        out[s] = Cost(s, n, allowed, affine(ends[0], p[0], ends[1], p[1]), affine(ends[0], m[0], ends[1], m[1]))
    return out


def apply_counts(stage: BudgetStage, model: nn.Module, counts: dict[str, int], table: dict[str, Cost], step: int,
                 data: Any, example: Any, device: Any, plan: bool, progress: bool = False) -> list[dict[str, Any]]:
    """Remove ``counts`` per group of each structure in order (blocks first), in place."""
    from .prune import prune_structure

    reports = []
    for s in ORDER:
        k = counts.get(s, 0)
        if k == 0:
            continue
        cfg = stage.structure(s, table[s].ratio(k), step, model)
        reports.append(prune_structure(model, cfg, data=None if plan else data, example_inputs=example,
                                       plan=plan, device=device, progress=progress).report)
    return reports


def _size(model: nn.Module, example: Any, metric: str) -> int:
    from ..evaluate.macs import count_macs

    if metric == "params":
        return sum(p.numel() for p in model.parameters())
    return int(count_macs(model, example) or 0)


def exact_size(stage: BudgetStage, model: nn.Module, counts: dict[str, int], table: dict[str, Cost], step: int,
               example: Any, metric: str) -> tuple[int, nn.Module]:
    shadow = copy.deepcopy(model)
    apply_counts(stage, shadow, counts, table, step, None, example, None, plan=True)
    return _size(shadow, example, metric), shadow


def _split(data: Any, search: int, held: int) -> tuple[Any, Any]:
    """The first batches holding ``search`` samples, and the last holding ``held``."""
    def take(batches: list[Any], n: int) -> list[Any]:
        out, got = [], 0
        for b in batches:
            if got >= n:
                break
            out.append(b)
            got += b.size
        return out

    return (replace(data, batches=tuple(take(list(data.batches), search))),
            replace(data, batches=tuple(reversed(take(list(reversed(data.batches)), held)))))


@torch.no_grad()
def held_loss(model: nn.Module, data: Any) -> float:
    was = model.training
    model.eval()
    try:
        losses = [float(data.loss(model, b)) for b in data.batches]
    finally:
        model.train(was)
    return sum(losses) / len(losses)


def _latency(model: nn.Module, other: nn.Module, data: Any) -> tuple[float, float]:
    from ..evaluate import latencies_ms

    window = data.prepared(model, data.batches[0].samples()[0])
    ms = latencies_ms({"a": model, "b": other}, lambda: dict(window.kwargs) if window.kwargs else window.args[0],
                      repeats=7)
    return ms["a"], ms["b"]


def _round_to(stage: BudgetStage, model: nn.Module, device: Any) -> tuple[int, dict[str, Any]]:
    if stage.round_to != "auto":
        return int(stage.round_to), {"round_to": int(stage.round_to), "round_to_source": "given"}
    if not any(s in UNIT_STRUCTURES for s in stage.structures):
        return 1, {"round_to": 1, "round_to_source": "no widths searched"}
    from ..evaluate.latency import fast_multiple

    cfg = getattr(model, "config", None)
    w = next(p for p in model.parameters() if p.dim() == 2)
    width = int(getattr(cfg, "intermediate_size", 0) or 1024)
    inner = int(getattr(cfg, "hidden_size", 0) or w.shape[1])
    measured, timing = fast_multiple(width, inner, device or w.device, w.dtype)
    # a multiple that leaves a group fewer than 8 widths to choose from would make the search coarse
    m = min(measured, max(k for k in (1, 8, 16, 32, 64, 128) if k == 1 or k <= width // 8))
    return m, {"round_to": m, "round_to_measured": measured,
               "round_to_source": f"measured on {device or w.device} ({str(w.dtype)[6:]})"
               + (f", capped at {m} so a {width}-wide group keeps 8 choices" if m < measured else ""),
               "round_to_us_per_column": timing}


def search(stage: BudgetStage, model: nn.Module, data: Any, device: Any = None, progress: bool = True) -> dict:
    """Run the budget search and prune ``model`` in place to the chosen candidate."""
    if data is None:
        raise ConfigError("budget: the search scores candidates on calibration data; pass --calib TEXT or data=...")
    start = time.perf_counter()
    example = data.trace_inputs(model)
    step, rounding = _round_to(stage, model, device)
    metric = stage.metric
    size0 = _size(model, example, metric)
    params0 = sum(p.numel() for p in model.parameters())
    table = costs(stage, model, example, step)
    smallest, deepest = exact_size(stage, model, {s: c.levels[-1] for s, c in table.items()}, table, step, example,
                                   metric)
    target, latency = _target(stage, model, data, deepest, example, size0, smallest)
    del deepest
    search_data, held = _split(data, stage.search_samples, stage.eval_samples)
    tried: dict[tuple, dict[str, Any]] = {}
    weights: dict[tuple, dict[str, float]] = {}
    for w in tqdm(mixes(stage.structures, stage.candidates), desc="budget candidates", disable=not progress,
                  leave=False):
        counts = solve(table, w, size0, target, metric)
        if counts is None:
            continue
        key = tuple(sorted(counts.items()))
        if key in tried:
            tried[key]["mix"] += f" | {label(w)}"
            continue
        trial = copy.deepcopy(model)
        apply_counts(stage, trial, counts, table, step, search_data, example, device, plan=False)
        tried[key] = {"mix": label(w), **{s: counts[s] for s in stage.structures},
                      f"{metric}_estimate": int(estimate(table, counts, size0, metric)),
                      "params": _size(trial, example, "params"), "loss": held_loss(trial, held)}
        weights[key] = w
        log.info("budget candidate %s: %s, held-out loss %.4f", label(w), counts, tried[key]["loss"])
        del trial
    if not tried:
        raise ConfigError(f"budget: no mix of {', '.join(stage.structures)} reaches {metric} {target:,.0f}; "
                          f"the smallest reachable is {smallest:,} {metric}")
    best = min(tried, key=lambda k: tried[k]["loss"])
    for key, row in tried.items():
        row["chosen"] = key == best
    counts = _tighten(stage, model, dict(best), table, step, example, metric, target, size0, weights[best])
    if latency is not None:
        counts = _meet_latency(stage, model, counts, table, step, example, size0, target, weights[best], data,
                               latency)
    reports = apply_counts(stage, model, counts, table, step, data, example, device, plan=False, progress=progress)
    report = {"structures": list(stage.structures), "metric": metric,
              **{t: getattr(stage, t) for t in TARGETS if getattr(stage, t) is not None},
              "method": next((r["method"] for r in reports if r["structure"] != "layers"), reports[0]["method"]),
              "chosen": {**counts, "mix": tried[best]["mix"]},
              "candidates": list(tried.values()), "loss_held_out": tried[best]["loss"],
              f"{metric}_before": size0, f"{metric}_after": _size(model, example, metric),
              "params_before": params0, "params_after": sum(p.numel() for p in model.parameters()),
              "smallest_reachable": smallest, "macs_before": reports[0]["macs_before"],
              "macs_after": reports[-1]["macs_after"], **rounding, "groups": [g for r in reports for g in r["groups"]],
              "resolved": [_resolved(stage, s, counts[s], table, step, model) for s in ORDER if counts.get(s)],
              "exact": all(r.get("exact", True) for r in reports), "search_seconds": time.perf_counter() - start}
    if latency is not None:
        report.update(latency)
    return report


def _meet_latency(stage: BudgetStage, model: nn.Module, counts: dict[str, int], table: dict[str, Cost], step: int,
                  example: Any, size0: float, target: float, w: dict[str, float], data: Any,
                  latency: dict[str, Any]) -> dict[str, int]:
    """Measure the chosen candidate's prefill beside the dense model's; while it is slower than
    the target, lower the MAC target by the miss and solve again along the same mix."""
    goal = stage.target_latency_ms
    dense_ms = latency["latency_ms_dense"]
    for _ in range(5):
        _, shadow = exact_size(stage, model, counts, table, step, example, "macs")
        dense_now, ms = _latency(model, shadow, data)
        ms *= dense_ms / dense_now  # in the units of the first measurement: load changes hit both alike
        latency.update(latency_ms_before=dense_ms, latency_ms_after=ms)
        if ms <= goal:
            return counts
        target *= goal / ms
        again = solve(table, w, size0, target, "macs")
        if again is None or again == counts:
            break
        counts = again
    raise ConfigError(f"budget: the best candidate runs in {ms:.2f} ms, over the target {goal} ms, and removing more "
                      "along its mix did not meet it on this device; raise the target or add structures")


def _resolved(stage: BudgetStage, s: str, k: int, table: dict[str, Cost], step: int, model: nn.Module) -> dict:
    """The structure stage that replays the chosen removal of ``s``."""
    from ..recipe import stage_to_dict

    return {"structure": stage_to_dict(stage.structure(s, table[s].ratio(k), step, model))}


def _tighten(stage: BudgetStage, model: nn.Module, counts: dict[str, int], table: dict[str, Cost], step: int,
             example: Any, metric: str, target: float, size0: float, w: dict[str, float]) -> dict[str, int]:
    """Check the chosen counts with an exact plan; while it misses the target (the cost model
    estimates), solve again for a target lowered by the miss."""
    goal = target
    for _ in range(6):
        exact, _ = exact_size(stage, model, counts, table, step, example, metric)
        if exact <= target:
            return counts
        goal -= exact - target
        again = solve(table, w, size0, goal, metric)
        if again is None:
            break
        counts = again
    raise ConfigError(f"budget: the exact plan of the best candidate has {exact:,} {metric}, over the target "
                      f"{target:,.0f}, and removing more along its mix did not meet it; lower the target slightly")


def _target(stage: BudgetStage, model: nn.Module, data: Any, deepest: nn.Module, example: Any,
            size0: float, smallest: int) -> tuple[float, dict[str, Any] | None]:
    """The size target in the search's metric (a latency target becomes a MAC target);
    ``deepest``: the model with every structure at its minimum (the fastest reachable)."""
    metric = stage.metric
    if stage.target_latency_ms is None:
        target = float(getattr(stage, f"target_{metric}"))
        _reachable(target, size0, smallest, metric, stage)
        return target, None
    dense_ms, fastest_ms = _latency(model, deepest, data)
    if stage.target_latency_ms < fastest_ms:
        raise ConfigError(f"budget: target latency {stage.target_latency_ms} ms is below the fastest reachable: "
                          f"{fastest_ms:.2f} ms with every {', '.join(stage.structures)} group at its minimum "
                          f"(dense {dense_ms:.2f} ms) on this device")
    if stage.target_latency_ms >= dense_ms:
        raise ConfigError(f"budget: the dense model already runs in {dense_ms:.2f} ms <= the target "
                          f"{stage.target_latency_ms} ms; nothing to prune")
    ratio = (stage.target_latency_ms - fastest_ms) / (dense_ms - fastest_ms)  # latency ~ affine in MACs
    target = smallest + ratio * (size0 - smallest)
    return target, {"latency_ms_dense": dense_ms, "latency_ms_fastest": fastest_ms, "macs_target": target}


def _reachable(target: float, size0: float, smallest: int, metric: str, stage: BudgetStage) -> None:
    if target >= size0:
        raise ConfigError(f"budget: the model has {size0:,.0f} {metric}, already within the target {target:,.0f}; "
                          "nothing to prune")
    if target < smallest:
        raise ConfigError(f"budget: target {target:,.0f} {metric} is below the smallest size --structure "
                          f"{','.join(stage.structures)} can reach: {smallest:,} {metric} (every group keeping "
                          "its minimum); raise the target or add structures")


def plan_budget(stage: BudgetStage, model: nn.Module, example: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """Sizes only (``--dry-run``): the counts the all-structures mix needs, applied in place
    with stand-in units; which mix wins is decided at run time by held-out loss."""
    if stage.target_latency_ms is not None:
        raise ConfigError("budget: a latency target is met by measuring candidates on the device; it has no dry run "
                          "(use --target-params or --target-macs to preview sizes)")
    step = int(stage.round_to) if stage.round_to != "auto" else 1
    metric = stage.metric
    size0 = _size(model, example, metric)
    table = costs(stage, model, example, step)
    smallest, _ = exact_size(stage, model, {s: c.levels[-1] for s, c in table.items()}, table, step, example, metric)
    target = float(getattr(stage, f"target_{metric}"))
    _reachable(target, size0, smallest, metric, stage)
    w = mixes(stage.structures, 1)[0]
    counts = _tighten(stage, model, solve(table, w, size0, target, metric) or {}, table, step, example, metric,
                      target, size0, w)
    reports = apply_counts(stage, model, counts, table, step, None, example, None, plan=True)
    notes = [f"shown: the mix {label(w)}; the run tries up to {stage.candidates} mixes and keeps the one with the "
             "least held-out calibration loss", f"smallest reachable: {smallest:,} {metric}"]
    if stage.round_to == "auto":
        notes.append("round_to auto is measured on the device at run time; shown without rounding")
    return reports, notes


__all__ = ["BudgetStage", "search", "plan_budget", "costs", "apply_counts", "held_loss"]

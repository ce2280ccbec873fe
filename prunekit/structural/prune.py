"""Structural pruning end to end: trace, score, allocate, remove, check, report."""
from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
from torch import Tensor, nn

from ..calibration import CalibrationData, RunOptions, as_calibration
from ..calibration.data import LossFn
from ..calibration.gradients import gradient_moments, loss_gradients
from ..errors import ConfigError, NoSuchStructure, StructureError
from ..recipe import one_stage
from ..result import Result, StructureResult  # noqa: F401 (StructureResult: the old name)
from .config import StructureConfig
from .graph import Graph, Group, Member, build_graph, every_block
from ..evaluate.macs import count_macs
from .remove import remove_units
from .rules import RULES
from .trace import trace_model
from .undo import Undo
from .scores import ScoreContext, check_applies, input_dim
from ..allocation.units import count_to_remove, global_threshold, lowest, smallest_ratio
from ..rounding import count
from .stats import input_moments

log = logging.getLogger(__name__)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prune_structure(model: nn.Module, config: StructureConfig, *, data: Any = None, example_inputs: Any = None,
                    loss_fn: LossFn | None = None, tokenizer: Any = None, progress: bool = False,
                    device: Any = None, plan: bool = False) -> Result:
    """Remove ``config.ratio`` of the chosen structure from ``model`` in place.

    ``data``: calibration data for data-aware scores: a
    :class:`~prunekit.calibration.CalibrationData`, token ids ``(N, T)``, an ``(inputs,
    labels)`` pair, inputs, or a list/DataLoader of batches. ``example_inputs``: one input for
    tracing (default: cut from ``data``). ``loss_fn(model, batch)``: for gradient scores when
    the default (LM loss, or cross-entropy on labelled pairs) does not fit. ``progress``: a
    bar over blocks. ``device``: where blocks compute while statistics are gathered.
    ``plan``: size the removal without scoring (no statistics): every group loses the same
    number of units as the real run, taken in order, so sizes and MACs are those the real run
    gets (:func:`prunekit.plan` runs this on a copy of the model).
    """
    from ..resolve import check_structure

    start = time.perf_counter()
    config = config.resolved(model)
    check_structure(config)
    calib = as_calibration(data, config.batch_size, loss_fn=loss_fn) if data is not None else None
    example = example_inputs if example_inputs is not None else (calib.trace_inputs(model) if calib else None)
    if example is None:
        raise ConfigError("structural pruning traces one forward pass: pass example_inputs=... or calibration data")
    options = RunOptions(device=device, progress=progress, desc=f"statistics ({config.method})")
    if config.method == "slicegpt":  # rotates and slices the residual stream: no graph, no unit scores
        from .slicegpt import prune_slicegpt

        return prune_slicegpt(model, config, calib, options, tokenizer, example, plan)
    params_before = count_params(model)
    units = config.structure not in ("layers", "experts")
    # Removing whole blocks or experts needs no graph: trace only for units (and for MACs,
    # counted when the tracer can, None when it cannot).
    graph = build_graph(model, example, ignore=config.ignore) if units else None
    macs_before = graph.macs if graph is not None else count_macs(model, example)
    config_changes: dict[str, Any] = {}
    undo = Undo(model)  # from here on, any failure puts the caller's model back
    try:
        if config.structure == "layers":
            summary, config_changes = _prune_layers(model, config, calib, options, plan)
        elif config.structure == "experts":
            summary, config_changes = _prune_experts(model, config, calib, options, plan)
        else:
            summary, _ = _prune_units(model, graph, config, calib, options, plan)
        macs_after = _still_runs(model, example, config, units, graph)
    except BaseException:
        undo.restore()
        raise
    seconds = time.perf_counter() - start
    report = {
        "structure": config.structure, "ratio": config.ratio, "method": config.method,
        "allocation": config.allocation, "params_before": params_before, "params_after": count_params(model),
        "macs_before": macs_before, "macs_after": macs_after, "seconds": seconds,
        "graph_seconds": graph.seconds if graph is not None else 0.0, "groups": summary,
        "exact": not any(g.get("inexact") for g in summary), **achieved(config.ratio, summary),
    }
    report["config_changes"] = config_changes
    if graph is not None and graph.black_boxes:  # modules the tracer could not follow, left whole
        report["black_boxes"] = graph.black_boxes
    log.info("removed %s: %d -> %d params in %.1f s", config.structure, params_before, report["params_after"], seconds)
    history = [{"kind": "structure", "config": config.to_dict()["structural"], "seconds": seconds}]
    return Result(model, one_stage(config), report, history, tokenizer)


def _call(model: nn.Module, example: Any) -> Any:
    if isinstance(example, dict):
        return model(**example)
    return model(*example) if isinstance(example, tuple) else model(example)


def _still_runs(model: nn.Module, example: Any, config: StructureConfig, units: bool,
                graph: Graph | None = None) -> int | None:
    """The pruned model's MACs, after checking it still runs (a failure raises, naming the
    module it failed in; the caller restores the model)."""
    names = {id(m): n for n, m in model.named_modules()}
    stack: list[str] = []

    def enter(module: nn.Module, args: Any) -> None:
        stack.append(names.get(id(module), stack[-1] if stack else ""))  # a foreign module is its caller's

    def leave(module: nn.Module, args: Any, out: Any) -> None:
        if stack:
            stack.pop()

    hooks = [torch.nn.modules.module.register_module_forward_pre_hook(enter),
             torch.nn.modules.module.register_module_forward_hook(leave)]
    try:
        with torch.no_grad():
            _call(model, example)
    except Exception as exc:  # noqa: BLE001 - any failure here means the model no longer runs
        where = next((n for n in reversed(stack) if n), "<model>")
        owner = model.get_submodule(where) if where != "<model>" else model
        raise StructureError(
            f"removing {config.structure} leaves a model that no longer runs: {type(owner).__name__} "
            f"{where!r} fails ({type(exc).__name__}: {exc}); it probably takes a size from its config or "
            f"hard-codes one in its forward, so {config.structure} cannot be removed from this family "
            f"as it is written. The model was restored as it was before pruning; prune another structure"
            + (f", or leave that module whole with ignore=[r'{every_block(where)}']" if where != "<model>" else "")
        ) from exc
    finally:
        for h in hooks:
            h.remove()
    if not units:
        return count_macs(model, example)
    boxes = tuple(config.ignore) + tuple(b["modules"] for b in (graph.black_boxes if graph is not None else ()))
    return trace_model(model, example, RULES, opaque=boxes).macs  # MACs only: no groups needed


def _prune_units(model: nn.Module, graph: Graph, cfg: StructureConfig, data: CalibrationData | None,
                 options: RunOptions, plan: bool = False) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    groups = [g for g in graph.of_kind(*cfg.kinds) if not cfg.ignored(g.name)
              and not any(cfg.ignored(p) for p in g.params)]
    if not groups and cfg.structure == "heads" and not graph.trace.roles["heads"] and not graph.black_boxes:
        raise NoSuchStructure(f"{type(model).__name__} has no attention heads (no attention op was traced)")
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    if not groups and cfg.structure == "neurons" and linears <= 1 and not graph.black_boxes:
        raise NoSuchStructure(f"{type(model).__name__} has no hidden neurons (at most one Linear layer: "
                              "its classifier); prune channels instead")
    if not groups:
        boxes = "; ".join(f"{b['modules']} (op {b['op']!r})" for b in graph.black_boxes)
        raise StructureError(
            f"{type(model).__name__} has no prunable {cfg.structure} (groups found: {graph.summary() or 'none'}); "
            "units that reach the model's output or input cannot be removed"
            + (f"; these modules could not be traced and were left whole: {boxes}" if boxes else "")
        )
    mode = cfg.heads
    if cfg.structure == "heads" and mode == "auto":  # whole key/value groups where a layer has several
        mode = "query" if any(len(g) == 1 for g in groups) and all(g.sub_units for g in groups) else "kv"
    query = cfg.structure == "heads" and mode == "query"
    if query:
        for g in groups:
            if not g.sub_units:
                raise ConfigError(f"{g.name} has one query head per key/value head; use heads='kv' there")
    else:
        for g in groups:
            if g.kind == "heads" and len(g) == 1:
                raise ConfigError(f"{g.name} has one key/value head, which cannot be removed: use --heads query "
                                  "(heads='query'), or --heads auto, to prune its query heads")
    sizes = [len(g.sub_units[0]) if query else len(g) for g in groups]
    counts = [count_to_remove(n, cfg.ratio_for(g.name), 1 if query else cfg.round_to, g.name)
              for g, n in zip(groups, sizes)] if query or cfg.allocation == "uniform" else None
    require_removal(cfg, sizes, sum(counts) if counts is not None else count(cfg.ratio, sum(sizes)),
                    "query heads per key/value group" if query else f"{cfg.structure} per group")
    score = check_applies(cfg.method, cfg.structure)
    ctx = ScoreContext(model, generator=torch.Generator().manual_seed(cfg.seed))
    compensate = cfg.bias_compensation if cfg.bias_compensation is not None else cfg.method == "flap"
    pools = [[s for u in g.sub_units for s in u] for g in groups] if query else [g.units for g in groups]
    if plan:  # sizes only: the first units of every group stand in for the ones scores would choose
        scores = [ctx.zeros(len(p)) for p in pools]
    else:
        if score.needs and not data:
            raise ConfigError(f"score {cfg.method!r} needs calibration data (--calib TEXT, or data=...)")
        if "inputs" in score.needs or compensate:
            if not data:
                raise ConfigError("bias compensation needs calibration data")
            wanted = {m.param for g in groups for m in g.units[0] if input_dim(m, ctx)}
            ctx.moments = input_moments(model, data, wanted, options=options)
        scores = [_finite(s, g.name) for s, g in zip(_score_all(score, pools, ctx, data), groups)]
    if query:
        picks = _query_heads(groups, scores, counts)
    else:
        names = [g.name for g in groups]
        picks = [lowest(s, k) for s, k in zip(scores, counts)] if counts is not None \
            else global_threshold(scores, cfg.ratio, names)
    chosen = [[pool[i] for i in idx] for pool, idx in zip(pools, picks)]
    units = [u for c in chosen for u in c]
    if compensate:
        compensate_bias(model, units, ctx, sizes_only=plan)
    attrs = remove_units(model, units)
    key = "removed_query_heads" if query else "removed_indices"
    # choices: the units a ratio is a fraction of (query heads per key/value group in query mode)
    summary = [{"name": g.name, "kind": g.kind, "units_before": len(g), "removed": len(c), "inexact": g.inexact,
                "choices": n, key: sorted(int(i) for i in idx)} for g, c, idx, n in zip(groups, chosen, picks, sizes)]
    return summary, attrs


def require_removal(cfg: StructureConfig, sizes: list[int], total: int, what: str) -> None:
    """A request that removes no unit is an error naming the smallest ratio that removes one
    (counts round half up: a ratio r of n units removes floor(r*n + 1/2))."""
    if total > 0:
        return
    smallest = [r for r in (smallest_ratio(n, cfg.round_to) for n in set(sizes)) if r is not None]
    hint = (f"the smallest ratio that removes a unit is {math.ceil(min(smallest) * 1000) / 1000:g}" if smallest
            else "no ratio removes a unit while every group keeps one")
    if cfg.overrides:
        raise ConfigError(f"ratio {cfg.ratio} with overrides {[list(o) for o in cfg.overrides]} removes nothing: "
                          "every group is overridden to keep all its units; loosen the overrides")
    each = "/".join(str(n) for n in sorted(set(sizes)))
    raise ConfigError(f"ratio {cfg.ratio} removes nothing: there are {each} {what}, and a ratio r of n units "
                      f"removes floor(r*n + 0.5) of them; {hint}")


def achieved(requested: float, summary: list[dict[str, Any]]) -> dict[str, Any]:
    """What was removed beside what was asked: ``removed`` of ``units_before`` over all groups."""
    before = sum(g["units_before"] for g in summary)
    removed = sum(g["removed"] for g in summary)
    return {"units_before": before, "units_removed": removed, "ratio_requested": requested,
            "ratio_achieved": removed / before if before else 0.0}


def _score_all(score: Any, pools: list[list[tuple[Member, ...]]], ctx: ScoreContext,
               data: CalibrationData | None) -> list[Tensor]:
    """Scores of every pool of units. Gradient scores are summed over per-batch gradients, as
    Molchanov et al. (2019) accumulate (sum w*g)^2 over minibatches: at a converged model the
    mean gradient vanishes but its per-batch fluctuation still tells units apart."""
    if "grads" not in score.needs:
        return [score(p, ctx) for p in pools]
    assert data is not None
    if "fisher" in score.needs:  # second-order scores read the totals: one backward per sample
        ctx.grads, ctx.fisher = gradient_moments(ctx.model, data)
        scores = [score(p, ctx) for p in pools]
        ctx.grads, ctx.fisher = {}, {}
        return scores
    total = [ctx.zeros(len(p)) for p in pools]
    for batch in data:
        ctx.grads = loss_gradients(ctx.model, data, batches=[batch])
        for t, p in zip(total, pools):
            t += score(p, ctx)
    ctx.grads = {}
    return total


def _finite(scores: Tensor, name: str) -> Tensor:
    if not torch.isfinite(scores).all():
        raise StructureError(f"scores of {name} are not finite (NaN/Inf weights, gradients or activations)")
    return scores


def _query_heads(groups: list[Group], scores: list[Tensor], counts: list[int]) -> list[list[int]]:
    """The same number (``counts``, per layer) of query heads from every key/value group (keeps
    GQA valid), as indices into the group's query heads in order (unit by unit)."""
    picks = []
    for g, s, k in zip(groups, scores, counts):
        rep = len(g.sub_units[0])
        sc = s.view(len(g), rep)
        picks.append([u * rep + i for u in range(len(g)) for i in lowest(sc[u], k)])
    return picks


def compensate_bias(model: nn.Module, units: list[tuple[Member, ...]], ctx: ScoreContext,
                    sizes_only: bool = False) -> None:
    """Fold the mean contribution of removed inputs into the consumer's bias (FLAP):
    ``b += W[:, removed] @ mean(x[removed])``. Linear consumers only; a missing bias is created
    (``sizes_only``: only that, for a plan)."""
    with torch.no_grad():
        for unit in units:
            for m in unit:
                if not input_dim(m, ctx) or (m.param not in ctx.moments and not sizes_only):
                    continue
                layer = ctx.module(m.param)
                if not isinstance(layer, nn.Linear):
                    continue
                if sizes_only:  # a stand-in bias, nonzero as compensation biases are, so counts agree
                    if layer.bias is None:
                        layer.bias = nn.Parameter(torch.ones(layer.out_features, dtype=layer.weight.dtype,
                                                             device=layer.weight.device))
                    continue
                idx = torch.tensor(m.index, device=layer.weight.device)
                mean = ctx.moments[m.param].mean.to(layer.weight.device)[idx]  # (removed,) float64
                shift = (layer.weight[:, idx].double() @ mean).float()  # (out,)
                if layer.bias is None:
                    layer.bias = nn.Parameter(torch.zeros(layer.out_features, dtype=layer.weight.dtype,
                                                          device=layer.weight.device))
                layer.bias.data = layer.bias.data + shift.to(layer.bias.dtype)  # a new tensor: undoable


def _prune_layers(model: nn.Module, cfg: StructureConfig, data: CalibrationData | None,
                  options: RunOptions, plan: bool = False) -> tuple[list[dict[str, Any]], dict]:
    from ..models.decoder import find_blocks
    from .layers import LAYER_SCORES, choose_blocks, remove_blocks

    name, blocks = find_blocks(model)
    require_removal(cfg, [len(blocks)], count(cfg.ratio, len(blocks)), "blocks")
    gen = torch.Generator().manual_seed(cfg.seed)
    scores = torch.zeros(len(blocks)) if plan else _finite(LAYER_SCORES.get(cfg.method)(model, data, gen, options), name)
    drop = choose_blocks(scores, cfg.ratio)
    changes = remove_blocks(model, drop)
    return [{"name": name, "kind": "layers", "units_before": len(blocks), "removed": len(drop),
             "removed_indices": drop, "scores": [round(float(s), 6) for s in scores]}], changes


def _prune_experts(model: nn.Module, cfg: StructureConfig, data: CalibrationData | None,
                   options: RunOptions, plan: bool = False) -> tuple[list[dict[str, Any]], dict]:
    from ..models.adapters import adapter_for
    from .experts import EXPERT_SCORES, find_moe_layers, remove_experts

    layers = [layer for layer in find_moe_layers(model) if not cfg.ignored(layer.name)]
    if not layers:
        raise NoSuchStructure(f"{type(model).__name__} has no mixture-of-experts layers (a module with gate + experts)")
    sizes = [layer.count for layer in layers]
    require_removal(cfg, sizes, sum(count_to_remove(n, cfg.ratio_for(la.name), 1, la.name)
                                    for n, la in zip(sizes, layers)), "experts per layer")
    scores = [torch.zeros(n) for n in sizes] if plan else \
        EXPERT_SCORES.get(cfg.method)(model, layers, data, torch.Generator().manual_seed(cfg.seed), options)
    summary = []
    for layer, s in zip(layers, scores):
        n = layer.count
        drop = lowest(_finite(s, layer.name), count_to_remove(n, cfg.ratio_for(layer.name), 1, layer.name))
        remove_experts(model, layer, drop)
        summary.append({"name": layer.name, "kind": "experts", "units_before": n, "removed": len(drop),
                        "removed_indices": drop})
    changes: dict[str, Any] = {}
    config = getattr(model, "config", None)
    counts = {layer.count for layer in layers}
    if config is not None and len(counts) == 1:
        n = counts.pop()
        for attr in adapter_for(model).sizes["experts"]:
            if isinstance(getattr(config, attr, None), int):
                setattr(config, attr, n)
                changes[attr] = n
    return summary, changes

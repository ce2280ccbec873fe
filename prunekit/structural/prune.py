"""Structural pruning end to end: trace, score, allocate, remove, check, report."""
from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import Tensor, nn

from ..calibration import CalibrationData, RunOptions, as_calibration
from ..calibration.data import LossFn
from ..calibration.gradients import loss_gradients
from ..errors import ConfigError, StructureError
from ..recipe import one_stage
from ..result import Result, StructureResult  # noqa: F401 (StructureResult: the old name)
from .config import StructureConfig
from .graph import Graph, Group, Member, build_graph
from .remove import remove_units
from .scores import ScoreContext, check_applies, input_dim
from ..allocation.units import count_to_remove, global_threshold, lowest, uniform
from .stats import input_moments

log = logging.getLogger(__name__)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prune_structure(model: nn.Module, config: StructureConfig, *, data: Any = None, example_inputs: Any = None,
                    loss_fn: LossFn | None = None, tokenizer: Any = None, progress: bool = False,
                    device: Any = None) -> Result:
    """Remove ``config.ratio`` of the chosen structure from ``model`` in place.

    ``data``: calibration data for data-aware scores: a
    :class:`~prunekit.calibration.CalibrationData`, token ids ``(N, T)``, an ``(inputs,
    labels)`` pair, inputs, or a list/DataLoader of batches. ``example_inputs``: one input for
    tracing (default: cut from ``data``). ``loss_fn(model, batch)``: for gradient scores when
    the default (LM loss, or cross-entropy on labelled pairs) does not fit. ``progress``: a
    bar over blocks. ``device``: where blocks compute while statistics are gathered.
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
    params_before = count_params(model)
    graph = build_graph(model, example, ignore=config.ignore)
    macs_before = graph.macs
    config_changes: dict[str, Any] = {}
    attrs: dict[str, dict[str, Any]] = {}
    if config.structure == "layers":
        summary, config_changes = _prune_layers(model, config, calib, options)
    elif config.structure == "experts":
        summary, config_changes = _prune_experts(model, config, calib, options)
    else:
        summary, attrs = _prune_units(model, graph, config, calib, options)
    try:
        after = build_graph(model, example, ignore=config.ignore)
    except Exception as exc:  # noqa: BLE001 - any failure here means the model no longer runs
        raise StructureError(
            f"the pruned model no longer runs ({type(exc).__name__}: {exc}); a module probably hard-codes a "
            "size in its forward (e.g. view(B, T, 12, 64)); use -1 there or exclude it with ignore=[...]"
        ) from exc
    seconds = time.perf_counter() - start
    report = {
        "structure": config.structure, "ratio": config.ratio, "method": config.method,
        "allocation": config.allocation, "params_before": params_before, "params_after": count_params(model),
        "macs_before": macs_before, "macs_after": after.macs, "seconds": seconds,
        "graph_seconds": graph.seconds, "groups": summary,
        "exact": not any(g.get("inexact") for g in summary),
    }
    report["config_changes"] = config_changes
    log.info("removed %s: %d -> %d params in %.1f s", config.structure, params_before, report["params_after"], seconds)
    history = [{"kind": "structure", "config": config.to_dict()["structural"], "seconds": seconds}]
    return Result(model, one_stage(config), report, history, tokenizer)


def _prune_units(model: nn.Module, graph: Graph, cfg: StructureConfig, data: CalibrationData | None,
                 options: RunOptions) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    groups = [g for g in graph.of_kind(*cfg.kinds) if not cfg.ignored(g.name)
              and not any(cfg.ignored(p) for p in g.params)]
    if not groups:
        raise StructureError(
            f"{type(model).__name__} has no prunable {cfg.structure} (groups found: {graph.summary() or 'none'}); "
            "units that reach the model's output or input cannot be removed"
        )
    score = check_applies(cfg.method, cfg.structure)
    ctx = ScoreContext(model, generator=torch.Generator().manual_seed(cfg.seed))
    compensate = cfg.bias_compensation if cfg.bias_compensation is not None else cfg.method == "flap"
    if score.needs and not data:
        raise ConfigError(f"score {cfg.method!r} needs calibration data (--calib TEXT, or data=...)")
    if "inputs" in score.needs or compensate:
        if not data:
            raise ConfigError("bias compensation needs calibration data")
        wanted = {m.param for g in groups for m in g.units[0] if input_dim(m, ctx)}
        ctx.moments = input_moments(model, data, wanted, options=options)
    if cfg.structure == "heads" and cfg.heads == "query":
        for g in groups:
            if not g.sub_units:
                raise ConfigError(f"{g.name} has one query head per key/value head; use heads='kv' there")
        pools = [[s for u in g.sub_units for s in u] for g in groups]
    else:
        for g in groups:
            if g.kind == "heads" and len(g) == 1:
                raise ConfigError(f"{g.name} has one key/value head, which cannot be removed: use --heads query "
                                  "(heads='query') to prune its query heads")
        pools = [g.units for g in groups]
    scores = [_finite(s, g.name) for s, g in zip(_score_all(score, pools, ctx, data), groups)]
    if cfg.structure == "heads" and cfg.heads == "query":
        chosen = _query_heads(groups, scores, cfg)
    else:
        names = [g.name for g in groups]
        if cfg.allocation == "uniform":
            picks = uniform(scores, [cfg.ratio_for(n) for n in names], cfg.round_to, names)
        else:
            picks = global_threshold(scores, cfg.ratio, names)
        chosen = [[g.units[i] for i in idx] for g, idx in zip(groups, picks)]
    units = [u for c in chosen for u in c]
    if compensate:
        compensate_bias(model, units, ctx)
    attrs = remove_units(model, units)
    summary = [{"name": g.name, "kind": g.kind, "units_before": len(g), "removed": len(c), "inexact": g.inexact}
               for g, c in zip(groups, chosen)]
    return summary, attrs


def _score_all(score: Any, pools: list[list[tuple[Member, ...]]], ctx: ScoreContext,
               data: CalibrationData | None) -> list[Tensor]:
    """Scores of every pool of units. Gradient scores are summed over per-batch gradients, as
    Molchanov et al. (2019) accumulate (sum w*g)^2 over minibatches: at a converged model the
    mean gradient vanishes but its per-batch fluctuation still tells units apart."""
    if "grads" not in score.needs:
        return [score(p, ctx) for p in pools]
    assert data is not None
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


def _query_heads(groups: list[Group], scores: list[Tensor], cfg: StructureConfig) -> list[list[tuple]]:
    """The same number of query heads from every key/value group (keeps GQA valid)."""
    chosen = []
    for g, s in zip(groups, scores):
        rep = len(g.sub_units[0])
        sc = s.view(len(g), rep)
        k = count_to_remove(rep, cfg.ratio_for(g.name), 1, f"{g.name} (query heads per group)")
        chosen.append([g.sub_units[u][i] for u in range(len(g)) for i in lowest(sc[u], k)])
    return chosen


def compensate_bias(model: nn.Module, units: list[tuple[Member, ...]], ctx: ScoreContext) -> None:
    """Fold the mean contribution of removed inputs into the consumer's bias (FLAP):
    ``b += W[:, removed] @ mean(x[removed])``. Linear consumers only; a missing bias is created."""
    with torch.no_grad():
        for unit in units:
            for m in unit:
                if not input_dim(m, ctx) or m.param not in ctx.moments:
                    continue
                layer = ctx.module(m.param)
                if not isinstance(layer, nn.Linear):
                    continue
                idx = torch.tensor(m.index, device=layer.weight.device)
                mean = ctx.moments[m.param].mean.to(layer.weight.device)[idx]  # (removed,) float64
                shift = (layer.weight[:, idx].double() @ mean).float()  # (out,)
                if layer.bias is None:
                    layer.bias = nn.Parameter(torch.zeros(layer.out_features, dtype=layer.weight.dtype,
                                                          device=layer.weight.device))
                layer.bias += shift.to(layer.bias.dtype)


def _prune_layers(model: nn.Module, cfg: StructureConfig, data: CalibrationData | None,
                  options: RunOptions) -> tuple[list[dict[str, Any]], dict]:
    from ..models.decoder import find_blocks
    from .layers import LAYER_SCORES, choose_blocks, remove_blocks

    name, blocks = find_blocks(model)
    gen = torch.Generator().manual_seed(cfg.seed)
    scores = _finite(LAYER_SCORES.get(cfg.method)(model, data, gen, options), name)
    drop = choose_blocks(scores, cfg.ratio)
    changes = remove_blocks(model, drop)
    return [{"name": name, "kind": "layers", "units_before": len(blocks), "removed": len(drop),
             "removed_indices": drop, "scores": [round(float(s), 6) for s in scores]}], changes


def _prune_experts(model: nn.Module, cfg: StructureConfig, data: CalibrationData | None,
                   options: RunOptions) -> tuple[list[dict[str, Any]], dict]:
    from ..models.adapters import adapter_for
    from .experts import EXPERT_SCORES, find_moe_layers, remove_experts

    layers = [layer for layer in find_moe_layers(model) if not cfg.ignored(layer.name)]
    if not layers:
        raise StructureError(f"{type(model).__name__} has no mixture-of-experts layers (a module with gate + experts)")
    scores = EXPERT_SCORES.get(cfg.method)(model, layers, data, torch.Generator().manual_seed(cfg.seed), options)
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

"""Running a recipe: every stage in order on one model with one calibration set, each
reported, all gathered in one :class:`~prunekit.result.Result`."""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .calibration import CalibrationData, as_calibration
from .errors import ConfigError, DataError
from .rounding import count
from .evaluate import peak_rss_mb
from .recipe import Recipe, stage_kind, stage_to_dict
from .result import Result

log = logging.getLogger(__name__)


def measure(model: nn.Module) -> dict[str, Any]:
    """Parameters (total, nonzero) and the sparsity of the prunable layers, with what it is
    measured over."""
    from .evaluate import count_params
    from .masking import prunable_parameters

    total, nonzero = count_params(model)
    try:
        layers = prunable_parameters(model)
    except Exception:  # noqa: BLE001 - a model with no prunable layers has no sparsity to report
        layers = {}
    numel = sum(p.numel() for p in layers.values())
    zeros = sum(int(p.numel() - torch.count_nonzero(p)) for p in layers.values())
    return {"params_total": total, "params_nonzero": nonzero, "pruned_layers_params": numel,
            "sparsity": zeros / max(numel, 1)}


def _calibration(recipe: Recipe, data: Any, tokenizer: Any) -> CalibrationData | None:
    c = recipe.calibration
    if data is not None:
        return as_calibration(data, c.batch_size, tokenizer=tokenizer, nsamples=c.nsamples, seqlen=c.seqlen,
                              seed=c.seed)
    if not recipe.needs_data:
        return None
    if tokenizer is None:
        raise DataError("the recipe needs calibration data: pass data=... or a model with a tokenizer")
    return CalibrationData.from_text(tokenizer, c.text, c.nsamples, c.seqlen, c.seed, c.batch_size)


def check(recipe: Recipe, model: nn.Module) -> None:
    """What can only be checked against the model, before any stage changes it."""
    from .schedules.oneshot import make_plan

    for stage in recipe.stages:
        if stage_kind(stage) == "weights":
            plan = make_plan(model, stage)  # blocks found, layers supported, N:M divides every width
            if stage.pattern.kind != "nm":
                largest = max(t.weight().numel() for t in plan.all_layers.values())
                if count(stage.sparsity, largest) == 0:
                    raise ConfigError(
                        f"sparsity {stage.sparsity} removes nothing: the largest layer has {largest:,} weights and "
                        f"a sparsity s of n weights removes floor(s*n + 0.5); use at least "
                        f"{math.ceil(0.5 / largest * 1e6) / 1e6:g}")
            return  # a later weights stage may follow a structure stage that changes widths


def run(recipe: Recipe, model: nn.Module, *, tokenizer: Any = None, data: Any = None, device: Any = None,
        progress: bool = True, previous: Result | None = None, checkpoint: str | Path | None = None) -> Result:
    """Run every stage of ``recipe`` on ``model`` (in place) and return the result.

    ``data``: calibration data (anything :func:`~prunekit.calibration.as_calibration` takes)
    instead of the recipe's text. ``device``: where blocks compute. ``previous``: the result
    ``model`` came from (its recipe and history are continued, so a saved result lists every
    stage that produced it). ``checkpoint``: a directory where a recipe of weights stages saves
    its progress after every block and every stage; run again with the same arguments, it
    resumes there (:mod:`prunekit.calibration.resume`) and gives the same result bit for bit.
    """
    from .calibration import distributed

    for stage in recipe.stages:
        if stage_kind(stage) != "weights":
            distributed.refuse(f"a {stage_kind(stage)} stage")
    check(recipe, model)
    calib = _calibration(recipe, data, tokenizer)
    ctx = StageContext(device, progress, tokenizer, recipe, _teacher(recipe, model))
    stages_report: list[dict[str, Any]] = []
    history = list(previous.history) if previous is not None else []
    keys = _stage_keys(recipe, model, calib) if checkpoint is not None else None
    done = _resume_stages(Path(checkpoint), keys, model, stages_report, history) if keys else 0
    report: dict[str, Any] = stages_report[-1] if stages_report else {}
    for i, stage in enumerate(recipe.stages):
        if i < done:
            continue
        kind = stage_kind(stage)
        before = measure(model)
        start = time.perf_counter()
        log.info("stage %d/%d: %s", i + 1, len(recipe.stages), kind)
        stage_ctx = dataclasses.replace(ctx, checkpoint=(Path(checkpoint) / f"stage-{i + 1}", keys[i])) \
            if keys else ctx
        details = STAGE_RUNNERS[kind](stage, model, calib, stage_ctx)
        after = measure(model)
        seconds = time.perf_counter() - start
        entry = {"stage": i + 1, "kind": kind, "params_before": before["params_total"],
                 "params_after": after["params_total"], "nonzero_before": before["params_nonzero"],
                 "nonzero_after": after["params_nonzero"], "sparsity": after["sparsity"],
                 "sparsity_of": "weights of the prunable layers (Linear, Conv, Conv1D; the LM head and embeddings excluded)",
                 **details, "seconds": seconds, "peak_rss_mb": peak_rss_mb()}
        stages_report.append(entry)
        history.append({"kind": kind, "config": stage_to_dict(stage), "seconds": seconds})
        report = entry
        if keys and i < len(recipe.stages) - 1:  # the last stage's result is the run's own output
            _save_stage(Path(checkpoint), i, keys[i], model, entry, history[-1])
    full = previous.recipe.stages + recipe.stages if previous is not None and previous.recipe is not None else None
    out_recipe = Recipe(full, recipe.calibration) if full else recipe
    final = {**report, **measure(model), "stages": stages_report}
    if previous is not None and isinstance(previous.report.get("stages"), list):  # for reports of the whole run
        final["previous_stages"] = [*previous.report.get("previous_stages", []), *previous.report["stages"]]
    return Result(model, out_recipe, final, history, tokenizer)


@dataclass(frozen=True)
class StageContext:
    """What a stage may need beside its model and data."""

    device: Any
    progress: bool
    tokenizer: Any
    recipe: Recipe
    teacher: nn.Module | None = None  # the model before the first stage, when a stage distils from it
    checkpoint: tuple[Path, str] | None = None  # (directory, key) where a weights stage saves its blocks


def _stage_keys(recipe: Recipe, model: nn.Module, calib: Any) -> list[str] | None:
    """One key per stage (the recipe up to it, the model's parameters' names, shapes and dtypes
    and its first and last tensors, the calibration batches); None when a stage cannot resume."""
    from .calibration import distributed
    from .calibration.resume import digest

    kinds = {stage_kind(s) for s in recipe.stages}
    if kinds != {"weights"} or distributed.active():
        log.info("checkpoints resume recipes of weights stages in one process; this run (%s) starts over if stopped",
                 ", ".join(sorted(kinds)))
        return None
    params = list(model.state_dict().items())
    signature = [(n, list(t.shape), str(t.dtype)) for n, t in params]
    batches = [t for b in (calib.batches if calib is not None else ()) for t in (*b.args, *b.kwargs.values())
               if isinstance(t, torch.Tensor)]
    base = digest(signature, params[0][1], params[-1][1], *batches)
    stages = recipe.to_dict()["stages"]
    return [digest(base, recipe.to_dict()["calibration"], stages[: i + 1]) for i in range(len(stages))]


def _save_stage(root: Path, i: int, key: str, model: nn.Module, entry: dict, history: dict) -> None:
    """The model after stage ``i`` and its report, the JSON written last (it marks the stage done)."""
    from .atomic import write_text_atomically
    from .calibration.resume import save_tensors

    root.mkdir(parents=True, exist_ok=True)
    save_tensors(model.state_dict(), root / f"stage-{i + 1}.safetensors")
    write_text_atomically(root / f"stage-{i + 1}.json",
                          json.dumps({"key": key, "entry": entry, "history": history}, default=str))


def _resume_stages(root: Path, keys: list[str], model: nn.Module, stages_report: list, history: list) -> int:
    """Load the last finished stage a stopped run saved; how many stages are done."""
    from safetensors.torch import load_file

    from .calibration.resume import load_into, read_record

    done = 0
    for i, key in enumerate(keys[:-1]):
        saved = read_record(root / f"stage-{i + 1}.json", key, root)
        if saved is None:
            break
        stages_report.append(saved["entry"])
        history.append(saved["history"])
        done = i + 1
    if done:
        load_into(model, load_file(str(root / f"stage-{done}.safetensors")), root, f"stage {done}'s model")
        log.info("resuming from %s: %d of %d stages were done", root, done, len(keys))
    return done


def _teacher(recipe: Recipe, model: nn.Module) -> nn.Module | None:
    """A frozen copy of the unpruned model, kept only when a stage distils from it."""
    if not any(stage_kind(s) == "recovery" and s.distill is not None and s.distill.teacher is None
               for s in recipe.stages):
        return None
    return copy.deepcopy(model).eval().requires_grad_(False)


def _weights(stage: Any, model: nn.Module, data: Any, ctx: StageContext) -> dict[str, Any]:
    from .evaluate import sparsity_report
    from .schedules import prune_oneshot

    device, progress = ctx.device, ctx.progress
    outcome = prune_oneshot(model, stage, data, progress=progress, device=device, checkpoint=ctx.checkpoint)
    nm = (stage.pattern.n, stage.pattern.m) if stage.pattern.kind == "nm" else None
    rep = sparsity_report(model, nm=nm, ignore=stage.target.ignore)
    for name, amount in outcome.amounts.items():
        rep["layers"][name]["allocated"] = amount
    weight = next(model.parameters())
    rep.update(method=stage.method, pattern=str(stage.pattern), allocation=stage.allocation.name,
               target_sparsity=stage.sparsity, dtype=str(weight.dtype).split(".")[-1],
               device=str(device if device is not None else weight.device))
    if outcome.unreached:
        rep["unreached"] = outcome.unreached
    from .calibration import distributed

    if distributed.active() and data is not None:
        n = len(data.batches)
        rep["data_parallel"] = {"ranks": distributed.world_size(), "batches_per_rank": [
            b - a for a, b in (distributed.shard_bounds(n, distributed.world_size(), r)
                               for r in range(distributed.world_size()))]}
    if outcome.dead_inputs:  # every calibration input zero: pruned by magnitude or left dense, not emptied
        rep["dead_inputs"] = outcome.dead_inputs
    if outcome.left_dense:  # weights of layer types one-shot pruning does not handle (e.g. Mamba's A_log)
        rep["left_dense"] = outcome.left_dense
    return rep


def _structure(stage: Any, model: nn.Module, data: Any, ctx: StageContext) -> dict[str, Any]:
    from .structural.prune import prune_structure

    return dict(prune_structure(model, stage, data=data, progress=ctx.progress, device=ctx.device).report)


def _budget(stage: Any, model: nn.Module, data: Any, ctx: StageContext) -> dict[str, Any]:
    from .structural.budget import search

    return search(stage, model, data, device=ctx.device, progress=ctx.progress)


def _training(stage: Any, model: nn.Module, data: Any, ctx: StageContext) -> dict[str, Any]:
    from .stages import run_training

    return run_training(stage, model, data, ctx.progress)


def _recovery(stage: Any, model: nn.Module, data: Any, ctx: StageContext) -> dict[str, Any]:
    from .stages import run_recovery

    teacher = ctx.teacher
    if stage.distill is not None and stage.distill.teacher is not None:
        from .api import load

        log.info("loading the teacher %s", stage.distill.teacher)
        weight = next(model.parameters())
        teacher = load(stage.distill.teacher).model.to(device=weight.device, dtype=weight.dtype)
        teacher.eval().requires_grad_(False)
    if stage.distill is not None and stage.distill.text is not None:
        if ctx.tokenizer is None:
            raise ConfigError("recovery: distill text needs the model's tokenizer")
        c = ctx.recipe.calibration
        data = CalibrationData.from_text(ctx.tokenizer, stage.distill.text, c.nsamples, c.seqlen, c.seed,
                                         c.batch_size)
    return run_recovery(stage, model, data, ctx.progress, teacher=teacher)


def _tokens(stage: Any, model: nn.Module, data: Any, ctx: StageContext) -> dict[str, Any]:
    """Apply the token stage to the finished model (it stays applied: the result's model runs
    with it; ``prunekit.tokens.remove(result.model)`` takes it off) and measure it on the
    calibration data against the model with it off."""
    from .tokens import TOKEN_METHODS, apply, is_causal_lm
    from .tokens.report import stage_report

    switched = None
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if "last_attn" in TOKEN_METHODS.get(stage.method).prompt_needs and impl != "eager" and is_causal_lm(model) \
            and hasattr(model, "set_attn_implementation"):
        # the stage's method reads attention probabilities, which only eager attention forms
        log.info("tokens: %s reads attention probabilities; switching %s from %r to eager attention", stage.method,
                 type(model).__name__, impl)
        model.set_attn_implementation("eager")
        switched = f"{impl} -> eager ({stage.method} reads attention probabilities)"
    handle = apply(model, stage)
    report = stage_report(handle, data)
    if switched is not None:
        report["attn_implementation"] = switched
    return report


STAGE_RUNNERS = {"weights": _weights, "structure": _structure, "budget": _budget, "training": _training,
                 "recovery": _recovery, "tokens": _tokens}

__all__ = ["run", "check", "measure", "STAGE_RUNNERS"]

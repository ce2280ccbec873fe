"""One-shot post-training pruning: allocate per-layer amounts, then prune block by block
(with calibration statistics when the score, reconstruction or allocation needs them)."""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..allocation import ALLOCATIONS, LayerRef
from ..calibration import distributed
from ..calibration import CalibrationData, InputStats, RunOptions, as_calibration, run_sequential
from ..config import PruneConfig
from ..errors import ConfigError, DataError, UnsupportedModelError
from ..models import find_blocks
from ..patterns import MaskSpec, check_nm_shape
from ..patterns.permute import channel_permutation, input_permutations
from ..reconstruct import RECONSTRUCTIONS, GroupProblem, Segment
from ..reconstruct.base import inverse_factor
from ..reconstruct.mask_only import choose_masks, element_scores
from ..refine import REFINEMENTS, RefineProblem
from ..scoring import SCORES, LayerStats, Score
from ..resolve import check_weights, sparsegpt_params
from ..targets import Target, left_dense, select_layers

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """The model's candidate layers, block by block, and the resolved axes."""

    blocks_name: str
    blocks: nn.ModuleList
    layers: list[dict[str, Target]]
    config: PruneConfig
    score: Score
    grads: dict[str, torch.Tensor] = field(default_factory=dict)  # (out, in) loss gradients, for taylor
    dense: dict[str, list[int]] = field(default_factory=dict)  # parameters no supported layer holds: left dense
    input_perms: dict[str, torch.Tensor] = field(default_factory=dict)  # (in,) N:M channel order, permuted layers

    @property
    def all_layers(self) -> dict[str, Target]:
        return {n: t for block in self.layers for n, t in block.items()}

    def block_of(self, name: str) -> int:
        return next(i for i, block in enumerate(self.layers) if name in block)

    def generator(self, name: str) -> torch.Generator:
        # Seeded per layer, so a layer's random draws do not depend on processing order.
        return torch.Generator().manual_seed(self.config.seed * 1_000_003 + zlib.crc32(name.encode()))

    def spec(self, amount: float) -> MaskSpec:
        p = self.config.pattern
        return MaskSpec(p.kind, amount, p.group or self.score.default_group, p.n, p.m)


@dataclass
class OneShotOutcome:
    """Per-layer amounts allocated, and the layers no calibration token reached (with what
    was done to them)."""

    amounts: dict[str, float]
    unreached: dict[str, str] = field(default_factory=dict)
    left_dense: dict[str, list[int]] = field(default_factory=dict)
    dead_inputs: dict[str, str] = field(default_factory=dict)  # layers whose inputs were all zero
    input_perms: dict[str, torch.Tensor] = field(default_factory=dict)  # layers whose N:M groups are permuted


def make_plan(model: nn.Module, config: PruneConfig) -> Plan:
    """Resolve the config, locate blocks and candidate layers, and check the pattern fits every
    layer, all before any change."""
    check_weights(config)
    blocks_name, blocks = find_blocks(model)
    layers = [select_layers(b, f"{blocks_name}.{i}", config.target.ignore) for i, b in enumerate(blocks)]
    if not any(layers):
        raise UnsupportedModelError(
            f"no prunable layers (nn.Linear, Conv1D or fused experts) inside {blocks_name}; check --ignore or the model"
        )
    if config.pattern.kind == "nm":
        for block in layers:
            for name, target in block.items():
                check_nm_shape(target.shape[1], config.pattern.m, name)
    dense = {n: shape for i, b in enumerate(blocks)
             for n, shape in left_dense(b, f"{blocks_name}.{i}", config.target.ignore).items()}
    if dense:
        log.warning("%d parameters inside %s belong to no supported layer and stay dense (%s%s)", len(dense),
                    blocks_name, ", ".join(list(dense)[:3]), ", ..." if len(dense) > 3 else "")
    return Plan(blocks_name, blocks, layers, config, SCORES.get(config.score), dense=dense)


def _calibration(data: Any, config: PruneConfig, why: str) -> CalibrationData:
    if data is None:
        raise DataError(f"{why} needs calibration data; pass token ids (nsamples, seqlen) or --calib TEXT")
    return as_calibration(data, config.calibration.batch_size)


def _options(config: PruneConfig, progress: bool, device: Any, desc: str) -> RunOptions:
    c = config.calibration
    return RunOptions(sequential=c.sequential, device=device, offload=c.offload, progress=progress, desc=desc)


def allocate(model: nn.Module, plan: Plan, data: Any, progress: bool, device: Any = None) -> dict[str, float]:
    """Per-layer sparsity from the allocation rule, ranking with the score's allocation proxy.
    A data-aware proxy (Wanda's |W|*||x||) gets input norms from one pass over the dense model."""
    cfg = plan.config
    rule = ALLOCATIONS.get(cfg.allocation.name)
    proxy = SCORES.get(plan.score.allocation_proxy)
    targets = plan.all_layers
    norms: dict[str, torch.Tensor] = {}
    if rule.uses_scores and proxy.needs:
        calib = _calibration(data, cfg, f"allocation {cfg.allocation.name!r} with score {proxy.name!r}")

        def keep_norms(group: list[str], inputs: InputStats) -> None:
            for name in group:
                norms[name] = inputs.input_norm

        run_sequential(model, calib, (plan.blocks_name, plan.blocks), plan.layers, keep_norms, modifies=False,
                       options=_options(cfg, progress, device, "allocation statistics"))

    def scorer(name: str):
        return lambda: proxy(targets[name].weight().float(), LayerStats(
            input_norm=norms.get(name), generator=plan.generator(name), grad=plan.grads.get(name)))

    refs = [LayerRef(n, plan.block_of(n), t.weight().numel(), scorer(n)) for n, t in targets.items()]
    return dict(zip(targets, rule(refs, cfg.sparsity, cfg.allocation)))


@torch.no_grad()
def prune_group(plan: Plan, targets: dict[str, Target], names: list[str], amounts: dict[str, float],
                stats: LayerStats, inputs: InputStats | None, score: Score | None = None) -> None:
    """Prune layers that share one input and write the result back. Scores and repairs are
    computed in float32 (at least); weights keep their own dtype. Masks alone are applied in
    place, layer by layer; a reconstruction solves the layers as one stacked problem.

    With ``permute`` (N:M only), the group's input channels are first reordered so that its
    groups of M keep the most score (patterns/permute.py); the masks are chosen, repaired and
    refined in that order, the weights are put back in the model's own order, and the
    permutation is kept in ``plan.input_perms`` for the report and the saved result."""
    score = score or plan.score
    grads = {n: plan.grads[n] for n in names if n in plan.grads}
    perm = group_permutation(plan, targets, names, stats, inputs, score, grads) if plan.config.permute else None
    if perm is None:
        for n in names:  # pruned again in the layout's own order: an earlier permutation no longer holds
            plan.input_perms.pop(n, None)
        _prune_group(plan, targets, names, amounts, stats, inputs, score, grads)
        return
    inverse = perm.argsort()  # (in,)
    for n in names:
        targets[n].set_weight(targets[n].weight()[:, perm])
    try:
        _prune_group(plan, targets, names, amounts, stats.permuted(perm),
                     None if inputs is None else inputs.permuted(perm), score,
                     {n: g[:, perm] for n, g in grads.items()})
    finally:
        for n in names:
            targets[n].set_weight(targets[n].weight()[:, inverse])
    plan.input_perms.update({n: perm.cpu() for n in names})


def group_permutation(plan: Plan, targets: dict[str, Target], names: list[str], stats: LayerStats,
                      inputs: InputStats | None, score: Score, grads: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """(in,) the input order under which the group's N:M masks keep the most score (one order
    for all layers that read the input), or None where the layout's own order is as good."""
    stacked, segments = _stack(plan, targets, names, {n: plan.config.sparsity for n in names})
    if inputs is not None and inputs.dim != stacked.shape[1]:
        raise ConfigError(f"permute reorders the input features of Linear layers; {names[0]} has "
                          f"{stacked.shape[1]} weight columns for {inputs.dim} input features "
                          "(a convolution); drop permute for this model or --ignore the layer")
    if grads:
        stats = replace(stats, grad=torch.cat([grads[n] for n in names]))
    problem = GroupProblem(stacked, segments, score, stats, inputs, sparsegpt_params(plan.config))
    pattern = plan.config.pattern
    perm = channel_permutation(element_scores(problem), pattern.n, pattern.m, generator=plan.generator(names[0]))
    return None if bool((perm == torch.arange(perm.numel(), device=perm.device)).all()) else perm


def _stack(plan: Plan, targets: dict[str, Target], names: list[str],
           amounts: dict[str, float]) -> tuple[torch.Tensor, tuple[Segment, ...]]:
    """The group's float32 weights stacked along rows (sum of outs, in), and each layer's rows."""
    weights = [targets[n].weight().float() for n in names]  # each (out_i, in)
    bounds = torch.tensor([0] + [w.shape[0] for w in weights]).cumsum(0).tolist()
    segments = tuple(Segment(bounds[k], bounds[k + 1], plan.spec(amounts[n])) for k, n in enumerate(names))
    return (weights[0] if len(weights) == 1 else torch.cat(weights)), segments


def _prune_group(plan: Plan, targets: dict[str, Target], names: list[str], amounts: dict[str, float],
                 stats: LayerStats, inputs: InputStats | None, score: Score, grads: dict[str, torch.Tensor]) -> None:
    reconstruction = plan.config.reconstruction if inputs is not None else "none"
    params = sparsegpt_params(plan.config)
    refine = plan.config.refine if inputs is not None else "none"
    if reconstruction == "none":
        shared = inverse_factor(inputs, params.damp, score.name) if "hessian" in score.needs else None
        for n in names:
            live = targets[n].weight()  # (out, in) view of the parameter
            seg = Segment(0, live.shape[0], plan.spec(amounts[n]))
            layer_stats = replace(stats, grad=grads.get(n))
            problem = GroupProblem(live.float(), (seg,), score, layer_stats, inputs, params, shared)
            pruned = choose_masks(problem)
            if refine == "none":
                live.masked_fill_(pruned, 0)
            else:
                dense = live.float()
                targets[n].set_weight(refined(plan, dense, dense.masked_fill(pruned, 0.0), pruned, seg.spec, inputs))
        return
    stacked, segments = _stack(plan, targets, names, amounts)  # reconstructions never write into stacked
    if grads:
        stats = replace(stats, grad=torch.cat([grads[n] for n in names]))
    problem = GroupProblem(stacked, segments, score, stats, inputs, params)
    new_weight, pruned = RECONSTRUCTIONS.get(reconstruction)(problem)
    for n, seg in zip(names, segments):
        rows = slice(seg.start, seg.stop)
        if refine == "none":
            targets[n].set_weight(new_weight[rows])
        else:
            targets[n].set_weight(refined(plan, stacked[rows], new_weight[rows], pruned[rows], seg.spec, inputs))


def refined(plan: Plan, dense: torch.Tensor, weight: torch.Tensor, pruned: torch.Tensor, spec: MaskSpec,
            inputs: InputStats) -> torch.Tensor:
    """One layer's weight (out, in) after the plan's refinement of its mask (DSnoT ...)."""
    problem = RefineProblem(dense, weight, pruned, inputs.mean.float(), inputs.variance.float(),
                            inputs.input_norm, spec, plan.config.refine_params)
    return REFINEMENTS.get(plan.config.refine)(problem)[0]


def _prune_data_free(plan: Plan, targets: dict[str, Target], names: list[str], amounts: dict[str, float],
                     score: Score) -> None:
    for name in names:
        prune_group(plan, targets, [name], amounts, LayerStats(generator=plan.generator(name)), None, score)


def target_gradients(model: nn.Module, targets: dict[str, Target], data: CalibrationData,
                     per_sample_l2: bool = False) -> dict[str, torch.Tensor]:
    """``name -> (out, in)`` loss gradient of every target, from one forward and backward of the
    whole (dense) model per calibration batch (per sample, and their L2 norm, with ``per_sample_l2``)."""
    from ..calibration.gradients import loss_gradients

    params = {f"p{i}": getattr(t.module, t.param) for i, t in enumerate(targets.values())}
    unique = {id(p): k for k, p in params.items()}
    grads = loss_gradients(model, data, {k: params[k] for k in unique.values()}, per_sample_l2=per_sample_l2)
    out = {}
    for i, (name, t) in enumerate(targets.items()):
        g = grads[unique[id(params[f"p{i}"])]]
        g = g[t.expert] if t.expert is not None else g
        out[name] = (g.t() if t.transposed else g).float()
    return out


def prune_oneshot(model: nn.Module, config: PruneConfig, data: Any = None, *, progress: bool = True,
                  device: Any = None, checkpoint: tuple[Any, str] | None = None) -> OneShotOutcome:
    """Prune ``model`` in place; returns the per-layer amounts and the unreached layers.

    ``data``: :class:`~prunekit.calibration.CalibrationData` or anything
    :func:`~prunekit.calibration.as_calibration` takes (token ids ``(N, T)``...). ``device``:
    where blocks compute (None: where the model is); the model stays where it is.
    ``checkpoint``: ``(directory, key)``: save after each block there and resume from it
    (:mod:`prunekit.calibration.resume`).
    """
    plan = make_plan(model, config)
    plan.input_perms = input_permutations(model)  # the model's own record, updated in place
    if {"grad", "grad_l2"} & plan.score.needs:
        distributed.refuse(f"score {config.score!r} (it reads gradients)")
        plan.grads = target_gradients(model, plan.all_layers, _calibration(data, config, f"score {config.score!r}"),
                                      per_sample_l2="grad_l2" in plan.score.needs)
    amounts = allocate(model, plan, data, progress, device)
    targets = plan.all_layers
    outcome = OneShotOutcome(amounts, left_dense=plan.dense, input_perms=plan.input_perms)
    needs_hessian = "hessian" in plan.score.needs or config.reconstruction == "sparsegpt"
    if not (plan.score.needs or config.reconstruction != "none"):
        _prune_data_free(plan, targets, list(targets), amounts, plan.score)
        return outcome
    calib = _calibration(data, config, f"score {config.score!r} / reconstruction {config.reconstruction!r}")

    def visit(names: list[str], inputs: InputStats) -> None:
        if inputs.tokens and not bool((inputs.input_norm > 0).any()):
            # every calibration input is zero (a dead branch): scores are all ties and SparseGPT
            # would zero the whole layer; treat it as unreached and say so
            outcome.dead_inputs.update({n: config.unreached for n in names})
            if config.unreached == "magnitude":
                _prune_data_free(plan, targets, names, amounts, SCORES.get("magnitude"))
            return
        stats = LayerStats(input_norm=inputs.input_norm, generator=plan.generator(names[0]))
        prune_group(plan, targets, names, amounts, stats, inputs)

    options = _options(config, progress, device, f"pruning ({config.method or config.score})")
    if checkpoint is not None:
        from ..calibration.resume import Checkpoint

        options = replace(options, checkpoint=Checkpoint(
            Path(checkpoint[0]), checkpoint[1], state=lambda: {"dead_inputs": outcome.dead_inputs},
            restore=lambda saved: outcome.dead_inputs.update(saved.get("dead_inputs", {}))))
    run = run_sequential(model, calib, (plan.blocks_name, plan.blocks), plan.layers, visit, gram=needs_hessian,
                         moments=config.refine != "none", modifies=True, options=options)
    if outcome.dead_inputs:
        log.warning("%d layers saw only zero calibration inputs (%s); %s", len(outcome.dead_inputs),
                    ", ".join(list(outcome.dead_inputs)[:4]),
                    "pruned by magnitude" if config.unreached == "magnitude" else "left dense")
    if run.unreached:
        log.warning("%d layers were reached by no calibration token (%s%s); %s", len(run.unreached),
                    ", ".join(run.unreached[:4]), ", ..." if len(run.unreached) > 4 else "",
                    "pruned by magnitude" if config.unreached == "magnitude" else "left dense")
        if config.unreached == "magnitude":
            _prune_data_free(plan, targets, run.unreached, amounts, SCORES.get("magnitude"))
        outcome.unreached = {n: config.unreached for n in run.unreached}
    return outcome

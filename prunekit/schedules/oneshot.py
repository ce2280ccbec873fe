"""One-shot post-training pruning: allocate per-layer amounts, then prune block by block
(with calibration statistics when the score, reconstruction or allocation needs them)."""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..allocation import ALLOCATIONS, LayerRef
from ..calibration import InputStats, run_sequential
from ..config import PruneConfig
from ..errors import DataError, UnsupportedModelError
from ..models import find_blocks
from ..patterns import MaskSpec, check_nm_shape
from ..reconstruct import RECONSTRUCTIONS, GroupProblem, Segment
from ..scoring import SCORES, LayerStats, Score
from ..targets import select_layers, set_weight_2d, weight_2d

@dataclass
class Plan:
    """The model's candidate layers, block by block, and the resolved axes."""

    blocks_name: str
    blocks: nn.ModuleList
    layers: list[dict[str, nn.Module]]
    config: PruneConfig
    score: Score

    @property
    def all_layers(self) -> dict[str, nn.Module]:
        return {n: m for block in self.layers for n, m in block.items()}

    def block_of(self, name: str) -> int:
        return next(i for i, block in enumerate(self.layers) if name in block)

    def generator(self, name: str) -> torch.Generator:
        # Seeded per layer, so a layer's random draws do not depend on processing order.
        return torch.Generator().manual_seed(self.config.seed * 1_000_003 + zlib.crc32(name.encode()))

    def spec(self, amount: float) -> MaskSpec:
        p = self.config.pattern
        return MaskSpec(p.kind, amount, p.group or self.score.default_group, p.n, p.m)


def make_plan(model: nn.Module, config: PruneConfig) -> Plan:
    """Locate blocks and candidate layers; check the pattern fits every layer before any change."""
    blocks_name, blocks = find_blocks(model)
    layers = [select_layers(b, f"{blocks_name}.{i}", config.target.ignore) for i, b in enumerate(blocks)]
    if not any(layers):
        raise UnsupportedModelError(
            f"no prunable layers (nn.Linear or Conv1D) inside {blocks_name}; check --ignore or the model type"
        )
    if config.pattern.kind == "nm":
        for block in layers:
            for name, module in block.items():
                check_nm_shape(weight_2d(module).shape[1], config.pattern.m, name)
    return Plan(blocks_name, blocks, layers, config, SCORES.get(config.score))


def _calibration_ids(data: Tensor | None, config: PruneConfig, why: str) -> Tensor:
    if data is None:
        raise DataError(f"{why} needs calibration data; pass token ids (nsamples, seqlen) or --calib TEXT")
    if data.dim() != 2 or data.shape[0] == 0 or data.shape[1] < 2:
        raise DataError(f"calibration data must be token ids of shape (nsamples, seqlen >= 2), got {tuple(data.shape)}")
    return data


def allocate(model: nn.Module, plan: Plan, data: Tensor | None, progress: bool) -> dict[str, float]:
    """Per-layer sparsity from the allocation rule, ranking with the score's allocation proxy.
    A data-aware proxy (Wanda's |W|*||x||) gets input norms from one pass over the dense model."""
    cfg = plan.config
    rule = ALLOCATIONS.get(cfg.allocation.name)
    proxy = SCORES.get(plan.score.allocation_proxy)
    modules = plan.all_layers
    norms: dict[str, Tensor] = {}
    if rule.uses_scores and proxy.needs:
        ids = _calibration_ids(data, cfg, f"allocation {cfg.allocation.name!r} with score {proxy.name!r}")

        def keep_norms(group: list[str], inputs: InputStats) -> None:
            for name in group:
                norms[name] = inputs.input_norm

        run_sequential(model, plan.blocks, plan.blocks_name, ids.to(_device(model)), plan.layers, keep_norms,
                       hessian=False, modifies=False, batch_size=cfg.calibration.batch_size,
                       progress=progress, desc="allocation statistics")

    def scorer(name: str):
        return lambda: proxy(weight_2d(modules[name]).float(),
                             LayerStats(input_norm=norms.get(name), generator=plan.generator(name)))

    refs = [LayerRef(n, plan.block_of(n), weight_2d(m).numel(), scorer(n)) for n, m in modules.items()]
    return dict(zip(modules, rule(refs, cfg.sparsity, cfg.allocation)))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def prune_group(plan: Plan, modules: dict[str, nn.Module], names: list[str], amounts: dict[str, float],
                stats: LayerStats, inputs: InputStats | None) -> None:
    """Prune layers that share one input as one stacked problem and write the result back."""
    weights = [weight_2d(modules[n]).float() for n in names]  # each (out_i, in)
    bounds = torch.tensor([0] + [w.shape[0] for w in weights]).cumsum(0).tolist()
    segments = tuple(Segment(bounds[k], bounds[k + 1], plan.spec(amounts[n])) for k, n in enumerate(names))
    stacked = weights[0] if len(weights) == 1 else torch.cat(weights)  # reconstructions never write into it
    problem = GroupProblem(stacked, segments, plan.score, stats, inputs, plan.config.sparsegpt)
    new_weight, _ = RECONSTRUCTIONS.get(plan.config.reconstruction)(problem)
    for n, seg in zip(names, segments):
        set_weight_2d(modules[n], new_weight[seg.start : seg.stop])


def prune_oneshot(model: nn.Module, config: PruneConfig, data: Tensor | None = None, *,
                  progress: bool = True) -> dict[str, float]:
    """Prune ``model`` in place; returns the per-layer sparsity that was allocated."""
    plan = make_plan(model, config)
    amounts = allocate(model, plan, data, progress)
    modules = plan.all_layers
    needs_hessian = "hessian" in plan.score.needs or config.reconstruction == "sparsegpt"
    if not (plan.score.needs or config.reconstruction != "none"):
        for name in modules:
            prune_group(plan, modules, [name], amounts, LayerStats(generator=plan.generator(name)), None)
        return amounts

    ids = _calibration_ids(data, config, f"score {config.score!r} / reconstruction {config.reconstruction!r}")

    def visit(names: list[str], inputs: InputStats) -> None:
        stats = LayerStats(input_norm=inputs.input_norm, generator=plan.generator(names[0]))
        prune_group(plan, modules, names, amounts, stats, inputs)

    run_sequential(model, plan.blocks, plan.blocks_name, ids.to(_device(model)), plan.layers, visit,
                   hessian=needs_hessian, modifies=True, batch_size=config.calibration.batch_size,
                   sequential=config.calibration.sequential,
                   progress=progress, desc=f"pruning ({config.method or config.score})")
    return amounts

"""The one sequential runner: capture the first block's inputs, then for each block gather
its target layers' input statistics, let a visitor use them (prune, or just record), and feed
the block's outputs to the next block. One-shot pruning, structural scores and allocation
statistics all run on it, so every capability scales like one block plus its activations.

Orders for a block that is being pruned (``modifies``):

* ``sequential="layer"`` (default): one pass; each layer is pruned just before it runs, from
  the inputs that the already-pruned layers before it produce (SparseGPT's "true
  sequential" order), every batch in flight at once (see :mod:`.lockstep`).
* ``sequential="block"``: statistics from the block as it was, pruning, then a second pass
  for the outputs (the order of the Wanda and SparseGPT reference code); one batch in
  flight, so the least memory.

A model without a list of blocks is run as one block. Blocks compute on ``device``; when it
differs from where the model lives, each block is moved there while it is calibrated and
moved back after (sequential onloading), so one accelerator handles a model larger than its
memory. Hidden states wait between blocks on the compute device, in CPU memory or on disk
(``offload``).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import CalibrationError, ConfigError, ReplayError
from ..targets import Target
from . import distributed
from .cache import OFFLOADS, HiddenCache, Offload
from .capture import BlockCall, capture_block_inputs
from .data import CalibrationData, model_device
from .groups import InputGroups
from .lockstep import GroupVisitor, Lockstep, new_stats, probe
from .resume import load_progress, restore_blocks, save_block
from .stats import InputStats
from .watch import unwatch, watch

log = logging.getLogger(__name__)
Sequential = Literal["layer", "block"]


@dataclass(frozen=True)
class RunOptions:
    """How the runner runs: ``sequential`` order, compute ``device`` (None: the model's),
    where hidden states wait (``offload``), progress bars."""

    sequential: Sequential = "layer"
    device: torch.device | str | None = None
    offload: Offload = "none"
    progress: bool = True
    desc: str = "blocks"
    checkpoint: Any = None  # a resume.Checkpoint: save after each block of a pruning pass, resume from it

    def __post_init__(self) -> None:
        if self.sequential not in ("layer", "block"):
            raise ConfigError(f"unknown sequential order {self.sequential!r}; use 'layer' or 'block'")
        if self.offload not in OFFLOADS:
            raise ConfigError(f"unknown offload {self.offload!r}; use one of {', '.join(OFFLOADS)}")


@dataclass
class Observer:
    """Extra things to watch while each block computes its outputs: ``hooks(index, block)``
    returns handles installed for that pass; ``batch(index, h_in, h_out)`` sees every batch's
    block input and output."""

    hooks: Callable[[int, nn.Module], list[Any]] | None = None
    batch: Callable[[int, Tensor, Tensor], None] | None = None


@dataclass
class RunReport:
    """What a run saw: target layers no calibration token reached, and the time per block."""

    unreached: list[str] = field(default_factory=list)
    block_seconds: list[float] = field(default_factory=list)
    whole_model: str = ""  # why blocks could not be replayed one by one ("" when they were)


class _StopBlock(Exception):
    """Skips the rest of a block once every target has seen its input (statistics pass)."""


def _check_finite(x: Tensor, where: str) -> None:
    if isinstance(x, Tensor) and x.is_floating_point() and not torch.isfinite(x).all():
        raise CalibrationError(
            f"NaN/Inf activations at {where}: the model overflows on the calibration data; "
            "load it in float32 (--dtype float32) or check its weights")


def stream(steps: list[Callable[[], None]], targets: dict[str, Target], groups: InputGroups, *,
           gram: bool, moments: bool, stop_early: bool) -> dict[str, InputStats]:
    """Run every step once with the targets watched; statistics per group leader.
    ``stop_early``: a batch stops right after the last group's input (its outputs are not needed)."""
    stats: dict[str, InputStats] = {}
    for b, step in enumerate(steps):
        defining = not groups.order

        def arrive(name: str, x: Tensor, b: int = b, defining: bool = defining) -> None:
            leader, is_leader = groups.arrive(name, x, b, defining)
            if not is_leader:
                return
            s = stats.get(leader)
            if s is None:
                s = stats[leader] = new_stats(x.movedim(1, -1) if targets[name].channels_first else x, gram, moments)
            s.add(x, channels_first=targets[name].channels_first)
            if (stop_early and not defining and len(groups.leader) == len(targets)
                    and leader == groups.order[-1]):
                raise _StopBlock

        handles = watch(targets, arrive)
        try:
            step()
        except _StopBlock:
            pass
        finally:
            unwatch(handles)
            groups.end_batch(b)
    return stats


class _Groups:
    """Input groups learned once per kind of block (same class, same target names relative
    to the block) and reused for the others."""

    def __init__(self) -> None:
        self.known: dict[tuple, tuple[dict[str, list[str]], list[str]]] = {}

    @staticmethod
    def signature(block: nn.Module, prefix: str, targets: dict[str, Target]) -> tuple:
        return type(block).__qualname__, tuple(n[len(prefix):] for n in targets)

    def get(self, block: nn.Module, prefix: str, targets: dict[str, Target], where: str) -> tuple[InputGroups, bool]:
        groups = InputGroups(list(targets), where)
        template = self.known.get(self.signature(block, prefix, targets))
        if template is None:
            return groups, False
        members, order = template
        groups.members = {prefix + k: [prefix + m for m in v] for k, v in members.items()}
        groups.leader = {m: lead for lead, ms in groups.members.items() for m in ms}
        groups.order = [prefix + k for k in order]
        return groups, True

    def learn(self, block: nn.Module, prefix: str, targets: dict[str, Target], groups: InputGroups) -> None:
        sig, cut = self.signature(block, prefix, targets), len(prefix)
        if sig not in self.known:
            self.known[sig] = ({k[cut:]: [m[cut:] for m in v] for k, v in groups.members.items()},
                               [k[cut:] for k in groups.order])


@torch.no_grad()
def run_sequential(model: nn.Module, data: CalibrationData, blocks: tuple[str, nn.ModuleList] | None,
                   layers: list[dict[str, Target]], visit: GroupVisitor, *, gram: bool = False,
                   moments: bool = False, modifies: bool = True, options: RunOptions = RunOptions(),
                   observer: Observer | None = None, keep_final: list[Tensor] | None = None) -> RunReport:
    """Visit every group of target layers of every block with the statistics of its input.

    ``blocks``: ``(name, ModuleList)`` of the model's blocks, or None to run the whole model
    as one block. ``layers[i]``: block i's targets by name. ``gram``: gather X^T X (else sums
    of squares only); ``moments``: float64 means and variances too. ``modifies``: the visitor
    changes weights, so outputs must come from the pruned block. ``keep_final``: a list that
    receives the last block's output for every batch.
    """
    if observer is not None and modifies:
        raise ValueError("observers see a block's only pass; use them with modifies=False")
    if distributed.active():  # each rank runs its shard; every visit sees all ranks' statistics
        if observer is not None:
            distributed.refuse("observing blocks (structural and allocation statistics)")
        data = dataclasses.replace(data, batches=tuple(distributed.shard(list(data.batches))))
        visit = distributed.reducing(visit, model)
    report = _run_sequential(model, data, blocks, layers, visit, gram, moments, modifies, options, observer,
                             keep_final)
    if distributed.active():  # a rank with layers left over would wait forever at its next visit
        distributed.agree("end", "the end of calibration (a rank has layers left to prune)")
    return report


def _run_sequential(model: nn.Module, data: CalibrationData, blocks: tuple[str, nn.ModuleList] | None,
                    layers: list[dict[str, Target]], visit: GroupVisitor, gram: bool, moments: bool,
                    modifies: bool, options: RunOptions, observer: Observer | None,
                    keep_final: list[Tensor] | None) -> RunReport:
    home = model_device(model)
    device = torch.device(options.device) if options.device is not None else home
    was_training = model.training
    model.eval()
    report = RunReport()
    known = _Groups()
    try:
        if blocks is None:
            extra = observer.hooks(0, model) if observer is not None and observer.hooks is not None else []
            try:
                _run_whole(model, data, layers[0], visit, gram, moments, modifies, options, report, device)
            finally:
                unwatch(extra)
            return report
        name, modules = blocks
        try:
            hiddens, calls = capture_block_inputs(model, modules, data)
        except ReplayError as exc:
            # Same statistics, from whole-model forwards: the lockstep still visits layer by
            # layer in execution order; memory holds one batch's activations, not one block's.
            log.warning("%s; calibrating with whole-model forwards instead", exc)
            report.whole_model = str(exc)
            merged = {n: t for block_layers in layers for n, t in block_layers.items()}
            extra = _observe_blocks(modules, observer) if observer is not None else []
            try:
                _run_whole(model, data, merged, visit, gram, moments, modifies, options, report, device)
            finally:
                unwatch(extra)
            return report
        for h in hiddens:
            _check_finite(h, "the input of the first block")
        # one checkpoint directory per run: several ranks would write the same one
        ckpt = options.checkpoint if modifies and not distributed.active() else None
        done = _resume(ckpt, modules, report, hiddens) if ckpt is not None else 0
        with HiddenCache(device, options.offload) as cache:
            for b, h in enumerate(hiddens):
                cache.put(b, h)
            del hiddens
            for i, block in enumerate(tqdm(modules, desc=options.desc, disable=not options.progress, leave=False)):
                if i < done:  # pruned before the run was stopped: its weights and outputs are restored
                    calls[i] = []
                    continue
                start = time.perf_counter()
                where = f"{name}.{i}"
                moved = device != home
                if moved:
                    block.to(device)
                block_calls = [c.to(device) for c in calls[i]] if moved else calls[i]
                calls[i] = []  # per-block arguments (masks, rotary) are not needed again
                try:
                    report.unreached += _run_block(i, block, where, block_calls, cache, layers[i], known, visit,
                                                   gram, moments, modifies, options, observer,
                                                   check_outputs=i == len(modules) - 1 or not layers[i + 1])
                finally:
                    if moved:
                        block.to(home)
                report.block_seconds.append(time.perf_counter() - start)
                if ckpt is not None:
                    save_block(ckpt, i, block, [cache.peek(b).cpu() for b in range(len(data))],
                               {"unreached": report.unreached, "block_seconds": report.block_seconds})
            if keep_final is not None:
                keep_final.extend(cache.take(b) for b in range(len(data)))
    finally:
        model.train(was_training)
    return report


def _run_block(i: int, block: nn.Module, where: str, calls: list[BlockCall], cache: HiddenCache,
               targets: dict[str, Target], known: _Groups, visit: GroupVisitor, gram: bool, moments: bool,
               modifies: bool, options: RunOptions, observer: Observer | None, check_outputs: bool) -> list[str]:
    n = len(calls)

    def output_step(b: int) -> Callable[[], None]:
        def step() -> None:
            h = cache.take(b)
            out = calls[b].run(block, h)
            if check_outputs:  # earlier blocks' NaNs surface in the next block's statistics
                _check_finite(out, f"the output of {where}")
            if observer is not None and observer.batch is not None:
                observer.batch(i, h, out)
            del h
            cache.put(b, out)
        return step

    def stats_step(b: int) -> Callable[[], None]:
        return lambda: calls[b].run(block, cache.peek(b))

    extra = observer.hooks(i, block) if observer is not None and observer.hooks is not None else []
    try:
        prefix = where + "."
        if not targets:
            for b in range(n):
                output_step(b)()
            return []
        groups, learned = known.get(block, prefix, targets, where)
        if modifies and options.sequential == "layer":
            if not learned:
                probe(stats_step(0), targets, groups)
                known.learn(block, prefix, targets, groups)
            lockstep = Lockstep(targets, groups, visit, gram=gram, where=where, moments=moments)
            return lockstep.run([output_step(b) for b in range(n)])
        if modifies:
            stats = stream([stats_step(b) for b in range(n)], targets, groups, gram=gram, moments=moments,
                           stop_early=True)
        else:
            stats = stream([output_step(b) for b in range(n)], targets, groups, gram=gram, moments=moments,
                           stop_early=False)
        known.learn(block, prefix, targets, groups)
        for leader in list(groups.order):
            names = groups.members[leader]
            s = stats.pop(leader)
            s.check_finite(f"{names[0]} (block {where})")
            visit(list(names), s)
        if modifies:
            for b in range(n):
                output_step(b)()
        return [t for t in targets if t not in groups.leader]
    finally:
        unwatch(extra)


def _observe_blocks(modules: nn.ModuleList, observer: Observer) -> list[Any]:
    """An observer's hooks on every block during whole-model forwards: its ``hooks`` per block,
    and ``batch`` fed each block's hidden input and output."""
    handles: list[Any] = []
    for i, block in enumerate(modules):
        if observer.hooks is not None:
            handles += observer.hooks(i, block)
        if observer.batch is not None:
            def seen(module: nn.Module, args: tuple, kwargs: dict, out: Any, i: int = i) -> None:
                h_in = args[0] if args else kwargs.get("hidden_states")
                h_out = out[0] if isinstance(out, (tuple, list)) else out
                if isinstance(h_in, Tensor) and isinstance(h_out, Tensor):
                    observer.batch(i, h_in, h_out)
            handles.append(block.register_forward_hook(seen, with_kwargs=True))
    return handles


def _resume(ckpt: Any, modules: nn.ModuleList, report: RunReport, hiddens: list[Tensor]) -> int:
    """Restore a stopped run's finished blocks (weights, and ``hiddens`` replaced by the
    outputs of the last one); how many blocks are done (0 without a checkpoint)."""
    progress = load_progress(ckpt)
    if progress is None:
        return 0
    saved = restore_blocks(ckpt, progress, modules)
    if len(saved) != len(hiddens) or any(a.shape != b.shape for a, b in zip(saved, hiddens)):
        raise ConfigError(f"the checkpoint in {ckpt.path} holds other calibration batches; delete it to start over")
    hiddens[:] = [h.to(dtype=old.dtype) for h, old in zip(saved, hiddens)]
    report.unreached += progress["report"]["unreached"]
    report.block_seconds += progress["report"]["block_seconds"]
    log.info("resuming from %s: %d of %d blocks were done", ckpt.path, progress["done"], len(modules))
    return progress["done"]


def _run_whole(model: nn.Module, data: CalibrationData, targets: dict[str, Target], visit: GroupVisitor,
               gram: bool, moments: bool, modifies: bool, options: RunOptions, report: RunReport,
               device: torch.device) -> None:
    """The whole model as one block: each batch is one forward of the model."""
    if device != model_device(model):
        raise ConfigError("a model without a list of blocks is calibrated where it lives; move it to "
                          f"{device} first or leave --device unset")
    steps = [lambda batch=batch: data.forward(model, batch) for batch in data]
    groups = InputGroups(list(targets), type(model).__name__)
    if modifies and options.sequential == "layer":
        probe(steps[0], targets, groups)
        report.unreached += Lockstep(targets, groups, visit, gram=gram, where=type(model).__name__).run(steps)
        return
    stats = stream(steps, targets, groups, gram=gram, moments=moments, stop_early=False)
    for leader in list(groups.order):
        visit(list(groups.members[leader]), stats.pop(leader))
    report.unreached += [t for t in targets if t not in groups.leader]


__all__ = ["run_sequential", "RunOptions", "RunReport", "Observer", "stream"]

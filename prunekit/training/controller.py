"""A sparsity controller for any PyTorch training loop.

    controller = SparsityController(model, optimizer, Gradual(target=0.9, end=1000))
    for x, y in loader:
        loss_fn(model(x), y).backward()
        optimizer.step(); optimizer.zero_grad()
        controller.step()

The controller owns a :class:`~prunekit.masking.Masker` (pruned weights stay exactly zero
through every optimizer step, whatever the optimizer) and advances a schedule
(:mod:`prunekit.schedules`) once per optimizer step. ``state_dict`` / ``load_state_dict``
save and resume it with the training checkpoint.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..masking import Masker, prunable_parameters, sparsity_report, transposed_names
from ..schedules.base import PruneContext, TrainingSchedule

log = logging.getLogger(__name__)


class InputNorms:
    """Running sums of squares of every masked layer's input features during training (for
    activation-aware scores such as Wanda), read at each pruning event and reset after it."""

    def __init__(self, model: nn.Module, params: Mapping[str, nn.Parameter]) -> None:
        owners = {id(getattr(m, "weight", None)): m for m in model.modules()}
        self.sums: dict[str, Tensor] = {}
        self.handles = []
        for name, p in params.items():
            module = owners.get(id(p))
            if isinstance(module, nn.modules.conv._ConvNd) or module is None:
                raise ConfigError(f"{name}: input norms are gathered for Linear and Conv1D layers, not "
                                  f"{type(module).__name__}; use a data-free score for convolutions")
            in_features = p.shape[0] if type(module).__name__ == "Conv1D" else p.shape[-1]  # Conv1D: (in, out)
            self.handles.append(module.register_forward_pre_hook(self._hook(name, in_features)))

    def _hook(self, name: str, in_features: int):
        def hook(module: nn.Module, args: tuple) -> None:
            with torch.no_grad():
                x = args[0].detach().reshape(-1, in_features).float()  # (tokens, in)
                sq = (x * x).sum(0)
                self.sums[name] = sq if name not in self.sums else self.sums[name] + sq

        return hook

    def norms(self) -> dict[str, Tensor]:
        return {n: s.sqrt() for n, s in self.sums.items()}

    def reset(self) -> None:
        self.sums.clear()

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


class SparsityController:
    """Keeps ``model``'s prunable weights masked through ``optimizer``'s steps and advances
    ``schedule``. Without a schedule, ``masks`` (True = pruned) are held fixed (lottery
    tickets, pruning at initialisation, recovery after one-shot pruning).

    ``params``: the parameters to mask (default: every Linear/Conv weight not matching a
    regular expression in ``ignore``). ``seed`` seeds the schedule's random draws. ``units``:
    structural groups (``build_graph(model, x).of_kind("channels")``) for schedules with
    ``channels=True``: whole coupled units are masked, and
    :func:`prunekit.structural.remove_masked_units` removes them exactly after training.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 schedule: TrainingSchedule | None = None, *, masks: Mapping[str, Tensor] | None = None,
                 params: Mapping[str, nn.Parameter] | None = None, ignore: Iterable[str] = (),
                 seed: int = 0, units: Any = ()) -> None:
        self.model = model
        self.optimizer = optimizer
        self.schedule = schedule
        self.params = dict(params) if params is not None else prunable_parameters(model, ignore)
        self.masker = Masker(self.params)
        self.generator = torch.Generator().manual_seed(seed)
        self.step_count = 0
        self.units = [list(g.units) if hasattr(g, "units") else list(g) for g in units]
        self.masker.attach(optimizer)  # raises OptimizerMismatchError first, before any change
        self.norms = InputNorms(model, self.params) if getattr(schedule, "needs_input_norms", lambda: False)() else None
        if masks is not None:
            self.masker.set_masks(masks)
        if schedule is not None:
            self._install(schedule.initial_masks(self._context()))
            self.masker.capture_dense_grads = schedule.needs_dense_grads(1)

    def _context(self) -> PruneContext:
        norms = self.norms.norms() if self.norms is not None else {}
        return PruneContext(self.params, self.masker.masks, self.generator, self.masker.dense_grads, self.units,
                            transposed_names(self.model, self.params), norms)

    def _install(self, masks: Mapping[str, Tensor] | None) -> None:
        if masks is None:
            return
        self.masker.set_masks(masks)
        if self.norms is not None:
            self.norms.reset()  # the next event scores with the inputs seen after this one
        log.debug("step %d: sparsity %.4f", self.step_count, self.masker.sparsity())

    def step(self) -> None:
        """Advance the schedule by one optimizer step; call it after ``optimizer.step()``."""
        self.step_count += 1
        if self.schedule is None:
            return
        self._install(self.schedule.update(self.step_count, self._context()))
        self.masker.dense_grads.clear()
        self.masker.capture_dense_grads = self.schedule.needs_dense_grads(self.step_count + 1)

    # -- inspection ----------------------------------------------------------------------
    @property
    def masks(self) -> dict[str, Tensor]:
        return self.masker.masks

    def sparsity(self) -> float:
        """Fraction of the controlled weights that are masked."""
        return self.masker.sparsity()

    def report(self) -> dict[str, dict]:
        """Per-parameter zeros (:func:`prunekit.masking.sparsity_report`) of the controlled weights."""
        return sparsity_report(self.model, self.params)

    def result(self, tokenizer: Any = None) -> Any:
        """A :class:`~prunekit.result.Result` of the training so far: the model, a report of its
        sparsity (overall and per weight) and a history entry for the schedule. Its recipe is
        None: a training loop is the caller's code, so prunekit cannot replay it."""
        from ..result import Result

        rows = self.report()
        total = rows.pop("__total__")
        report = {"kind": "training", "steps": self.step_count, "sparsity": total["sparsity"],
                  "pruned_layers_params": total["numel"], "layers": rows}
        history = [{"kind": "training", "schedule": repr(self.schedule), "steps": self.step_count,
                    "sparsity": total["sparsity"]}]
        return Result(self.model, None, {**report, "stages": [dict(report)]}, history, tokenizer)

    def make_permanent(self) -> nn.Module:
        """Remove every hook; the zeros stay in the weights. Returns the model."""
        self.masker.detach()
        if self.norms is not None:
            self.norms.close()
        return self.model

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Step count, masks (packed bool, on CPU) and RNG state; save it beside the model's
        and optimizer's state dicts."""
        return {
            "step": self.step_count,
            "masks": {n: m.detach().cpu().clone() for n, m in self.masker.masks.items()},
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore masks, step and RNG; load the model and optimizer state first."""
        missing = {"step", "masks", "generator"} - set(state)
        if missing:
            raise ConfigError(f"controller state lacks {sorted(missing)}; pass what state_dict() returned")
        unknown = set(state["masks"]) - set(self.params)
        if unknown:
            raise ConfigError(f"checkpoint masks name parameters this controller does not hold: {sorted(unknown)[:3]}")
        self.step_count = int(state["step"])
        self.generator.set_state(state["generator"])
        self.masker.set_masks(state["masks"])
        if self.schedule is not None:
            self.masker.capture_dense_grads = self.schedule.needs_dense_grads(self.step_count + 1)

"""Hugging Face ``Trainer`` callback: training-time pruning with a few lines.

    trainer = Trainer(model, args, train_dataset=ds,
                      callbacks=[SparsityCallback(Gradual(target=0.9, start=0, end=1000, frequency=50))])

The controller attaches at ``on_train_begin`` (the Trainer has built its optimizer by then),
advances after every optimizer step, and saves its state as ``prunekit_sparsity.pt`` inside
each ``checkpoint-N`` folder; ``trainer.train(resume_from_checkpoint=...)`` restores it.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable

import torch
from transformers import TrainerCallback

from ..schedules.base import TrainingSchedule
from .controller import SparsityController

log = logging.getLogger(__name__)
STATE_FILE = "prunekit_sparsity.pt"


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's / Lightning's wrappers (whose ``step`` would
    bypass hooks registered on the wrapper)."""
    while not type(optimizer).__module__.startswith("torch.optim") and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


class SparsityCallback(TrainerCallback):
    """Drives a :class:`SparsityController` from a ``transformers.Trainer``.

    ``schedule`` / ``masks`` / ``ignore`` / ``seed``: as for the controller. The controller is
    available as ``callback.controller`` once training has begun.
    """

    def __init__(self, schedule: TrainingSchedule | None = None, *, masks: dict | None = None,
                 ignore: Iterable[str] = (), seed: int = 0) -> None:
        self.schedule, self.masks, self.ignore, self.seed = schedule, masks, tuple(ignore), seed
        self.controller: SparsityController | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.controller = SparsityController(model, unwrap_optimizer(optimizer), self.schedule, masks=self.masks,
                                             ignore=self.ignore, seed=self.seed)
        if state.global_step > 0:  # resuming: the Trainer loaded checkpoint-{global_step}
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE
            if path.is_file():
                self.controller.load_state_dict(torch.load(path, weights_only=True))
                log.info("resumed sparsity state from %s (step %d)", path, state.global_step)
            else:
                log.warning("resuming at step %d without %s: sparsity restarts from the schedule", state.global_step, path)

    def on_step_end(self, args, state, control, **kwargs):
        self.controller.step()

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir() and args.should_save:
            torch.save(self.controller.state_dict(), folder / STATE_FILE)

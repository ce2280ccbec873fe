"""PyTorch Lightning callback (optional dependency: ``pip install lightning``).

    trainer = lightning.Trainer(callbacks=[lightning_callback(Gradual(target=0.9, end=1000))])

Attaches at ``on_train_start`` to the first optimizer, advances once per optimizer step
(gradient accumulation included) and saves its state in Lightning checkpoints through the
callback ``state_dict`` / ``load_state_dict`` protocol.
"""
from __future__ import annotations

from typing import Any, Iterable

from ..errors import PrunekitError
from ..schedules.base import TrainingSchedule
from .controller import SparsityController
from .hf import unwrap_optimizer


def lightning_callback(schedule: TrainingSchedule | None = None, *, masks: dict | None = None,
                       ignore: Iterable[str] = (), seed: int = 0) -> Any:
    """A ``lightning.pytorch.Callback`` driving a :class:`SparsityController`."""
    try:
        from lightning.pytorch import Callback
    except ImportError:
        try:
            from pytorch_lightning import Callback
        except ImportError:
            raise PrunekitError("the Lightning callback needs PyTorch Lightning; `pip install lightning`") from None

    class SparsityLightningCallback(Callback):
        def __init__(self) -> None:
            self.controller: SparsityController | None = None
            self._pending: dict | None = None  # state loaded before training started
            self._last_step = 0

        def on_train_start(self, trainer, pl_module) -> None:
            self.controller = SparsityController(pl_module, unwrap_optimizer(trainer.optimizers[0]), schedule,
                                                 masks=masks, ignore=ignore, seed=seed)
            if self._pending is not None:
                self.controller.load_state_dict(self._pending)
            self._last_step = trainer.global_step

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            while self._last_step < trainer.global_step:  # one call per optimizer step
                self._last_step += 1
                self.controller.step()

        def state_dict(self) -> dict:
            return self.controller.state_dict() if self.controller is not None else {}

        def load_state_dict(self, state: dict) -> None:
            if not state:
                return
            if self.controller is None:
                self._pending = state
            else:
                self.controller.load_state_dict(state)

    return SparsityLightningCallback()

"""Calibration data for structural scores: batches, forward, loss, and the statistics the
scores read (per-input-feature moments of every Linear/Conv input, accumulated gradients).

Data may be: token ids ``(N, T)`` (a causal LM), a pair ``(x, y)`` of tensors (a
classifier: loss is cross-entropy), a tensor of inputs (no loss), or a list of ready
batches (dicts of keyword arguments, tuples or tensors).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from tqdm.auto import tqdm

from ..errors import CalibrationError, ConfigError

LossFn = Callable[[nn.Module, Any], Tensor]


def batches(data: Any, batch_size: int) -> list[Any]:
    """Split ``data`` into model inputs."""
    if isinstance(data, Tensor):
        chunks = list(data.split(batch_size))
        if not data.is_floating_point() and data.ndim == 2:
            return [{"input_ids": c, "use_cache": False} for c in chunks]
        return chunks
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        return list(zip(data[0].split(batch_size), data[1].split(batch_size)))
    if isinstance(data, list):
        return data
    raise ConfigError(
        f"calibration data of type {type(data).__name__} is not understood; pass token ids (N, T), "
        "a tensor of inputs, an (inputs, labels) pair, or a list of batches"
    )


class Batches(list):
    """Calibration batches; every pass over them shows a progress bar when ``progress``."""

    def __init__(self, items: list[Any], progress: bool = False) -> None:
        super().__init__(items)
        self.progress = progress

    def __iter__(self) -> Iterator[Any]:
        return iter(tqdm(list.__iter__(self), total=len(self), desc="calibration batches",
                         disable=not self.progress, leave=False))


def example_of(batch: Any, rows: int = 1, tokens: int = 64) -> Any:
    """A small input for tracing, cut from a batch."""
    if isinstance(batch, dict):
        return {k: (v[:rows, :tokens] if isinstance(v, Tensor) and v.ndim == 2 else v) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return (batch[0][:rows],)
    return batch[:rows]


def forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, tuple):
        return model(batch[0])
    return model(batch)


def run_hooked(model: nn.Module, data: list[Any], handles: list[Any]) -> None:
    """Forward every batch without gradients so the hooks see it, then remove the hooks."""
    try:
        with torch.no_grad():
            for b in data:
                forward(model, b)
    finally:
        for h in handles:
            h.remove()


def default_loss(model: nn.Module, batch: Any) -> Tensor:
    """Causal-LM loss on token batches; cross-entropy on (x, y) pairs."""
    if isinstance(batch, dict) and "input_ids" in batch:
        return model(**batch, labels=batch["input_ids"]).loss
    if isinstance(batch, tuple) and len(batch) == 2:
        return nn.functional.cross_entropy(forward(model, batch), batch[1])
    raise ConfigError("a gradient score needs a loss: pass loss_fn(model, batch) -> scalar, or (inputs, labels) data")


@dataclass
class FeatureMoments:
    """Running moments of each input feature of one layer: ``(in,)`` sum and sum of squares."""

    total: Tensor
    squares: Tensor
    count: int = 0

    @property
    def mean(self) -> Tensor:
        return self.total / max(self.count, 1)

    @property
    def norm(self) -> Tensor:  # (in,) L2 norm over all samples
        return self.squares.sqrt()

    @property
    def variance(self) -> Tensor:  # (in,) sample variance (FLAP's fluctuation)
        n = max(self.count - 1, 1)
        return (self.squares - self.total**2 / max(self.count, 1)).clamp_min(0) / n


def _consumers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) or type(m).__name__ == "Conv1D":
            yield name, m


def input_moments(model: nn.Module, data: list[Any]) -> dict[str, FeatureMoments]:
    """``weight name -> FeatureMoments`` of the inputs of every Linear/Conv over ``data``."""
    stats: dict[str, FeatureMoments] = {}

    def hook(name: str, conv: bool) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            x = x.movedim(1, -1) if conv else x  # features last
            x = x.reshape(-1, x.shape[-1])  # (samples, in)
            if not torch.isfinite(x).all():
                raise CalibrationError(f"non-finite activations entering {name}; check the model and data")
            s = stats.get(name)
            if s is None:
                s = stats[name] = FeatureMoments(torch.zeros(x.shape[1]), torch.zeros(x.shape[1]))
            s.total += x.sum(0)
            s.squares += (x * x).sum(0)
            s.count += x.shape[0]

        return record

    run_hooked(model, data, [m.register_forward_pre_hook(hook(f"{n}.weight", isinstance(m, nn.modules.conv._ConvNd)))
                             for n, m in _consumers(model)])
    return stats


def accumulate_grads(model: nn.Module, data: list[Any], loss_fn: LossFn | None) -> dict[str, Tensor]:
    """``param name -> gradient`` summed over ``data`` (the model's own .grad is left as it was)."""
    loss_fn = loss_fn or default_loss
    saved = {n: p.grad for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(True)
            p.grad = None
        for b in data:
            loss = loss_fn(model, b)
            if not torch.isfinite(loss):
                raise CalibrationError(f"loss is {loss.item()} on calibration data; cannot score by gradient")
            loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    finally:
        for n, p in model.named_parameters():
            p.grad = saved.get(n)
            p.requires_grad_(flags[n])
        model.train(was_training)
    return grads

"""Gradients of the calibration loss with respect to chosen parameters (Taylor scores, SNIP):
one whole-model forward and backward per batch, since a loss needs the whole model. The
model's own ``.grad`` and ``requires_grad`` flags are left as they were."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..errors import CalibrationError
from .data import Batch, CalibrationData


def loss_gradients(model: nn.Module, data: CalibrationData, params: Mapping[str, nn.Parameter] | None = None,
                   batches: Sequence[Batch] | None = None, *, per_sample_l2: bool = False) -> dict[str, Tensor]:
    """``name -> d(sum of batch losses)/d(param)`` for ``params`` (default: every parameter),
    over ``batches`` (default: all of ``data``), each gradient on its parameter's device.

    ``per_sample_l2``: instead, the L2 norm over samples of each sample's gradient,
    ``sqrt(sum_n g_n^2)`` (GBLM-Pruner's gradient statistic), one backward per sample."""
    if per_sample_l2:
        return {n: s.sqrt() for n, s in gradient_moments(model, data, params, batches)[1].items()}
    return _accumulate(model, data, params, batches, per_sample=False)[0]


def gradient_moments(model: nn.Module, data: CalibrationData, params: Mapping[str, nn.Parameter] | None = None,
                     batches: Sequence[Batch] | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(sum_n g_n, sum_n g_n^2)`` over single samples: the gradient of the summed loss and the
    diagonal of the empirical Fisher information, from one backward per sample."""
    return _accumulate(model, data, params, batches, per_sample=True)


def _accumulate(model: nn.Module, data: CalibrationData, params: Mapping[str, nn.Parameter] | None,
                batches: Sequence[Batch] | None, per_sample: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    params = dict(params) if params is not None else dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    squares = {n: torch.zeros_like(p) for n, p in params.items()} if per_sample else {}
    was_training = model.training
    model.eval()
    try:
        for p in params.values():
            p.requires_grad_(True)
        with torch.enable_grad():
            batches = batches if batches is not None else data.batches
            if per_sample:
                batches = [one for batch in batches for one in batch.samples()]
            for batch in batches:
                loss = data.loss(model, batch)
                if not torch.isfinite(loss):
                    raise CalibrationError(f"loss is {loss.item()} on calibration data; cannot score by gradient")
                for n, g in zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
                    if g is not None:
                        grads[n] += g.detach()
                        if per_sample:
                            squares[n] += g.detach().square()
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
        model.train(was_training)
    return grads, squares

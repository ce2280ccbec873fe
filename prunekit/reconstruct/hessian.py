"""Inverse-Hessian factors for OBS-style pruning.

Factorised in float32 like the SparseGPT reference: with 1% dampening the Hessian is well
conditioned, and float64 costs ~3x the time on CPU. If the float32 factorisation fails,
dampening is raised and the factorisation retried in float64."""
from __future__ import annotations

import logging

import torch
from torch import Tensor

from ..errors import CalibrationError

log = logging.getLogger(__name__)


def damped_hessian(hessian: Tensor, damp: float) -> tuple[Tensor, Tensor]:
    """(in, in) Hessian -> (damped copy, dead (in,) bool).

    Dead inputs (never active in calibration) get a unit diagonal so H stays invertible;
    their weights carry no information about the output and are zeroed by the caller.
    """
    h = hessian.float().clone()  # (in, in)
    if not torch.isfinite(h).all():
        raise CalibrationError("the layer's Hessian has NaN/Inf entries: calibration activations overflowed")
    diag = h.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    diag += damp * diag.mean()
    return h, dead


def inverse_cholesky_upper(hessian: Tensor, damp: float, retries: int = 4) -> tuple[Tensor, Tensor]:
    """Upper Cholesky factor U of (H + damp*mean(diag H)*I)^-1, float32, and the dead mask.

    If H is not positive definite, dampening is raised tenfold (up to ``retries`` times)
    and float64 is used from then on.
    """
    h, dead = damped_hessian(hessian, damp)
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    extra = max(damp * abs(float(h.diagonal().mean())), 1e-8)
    for attempt in range(retries + 1):
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)  # (in, in)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return upper.float(), dead
        log.warning("Hessian not positive definite; raising dampening (attempt %d)", attempt + 1)
        h = h.double() + extra * eye.double()
        extra *= 10
    raise CalibrationError(
        "the layer's Hessian is not positive definite even after extra dampening; "
        "use more calibration samples (--nsamples) or a larger SparseGPT damp"
    )

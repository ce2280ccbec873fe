"""Delta pruning and merging as pure tensor functions.

A fine-tune is its base plus a delta ``d = θ_ft − θ_base``. A **delta method** decides, per
tensor, which entries of ``d`` survive and by what factor the survivors are scaled: it
returns ``(keep, scale)``, and the pruned fine-tune is ``θ_base + scale · keep ⊙ d``
(:func:`patch`). A **merge method** combines the deltas of several fine-tunes of one base into
one delta (``θ = θ_base + λ · merge(d_1 … d_k)``).

Deltas are computed in float64 for float32/float64 tensors and float32 for 16-bit ones: in
that precision ``θ_base + (θ_ft − θ_base)`` gives ``θ_ft`` back exactly, so dropping nothing
is the identity and merging identical fine-tunes gives the fine-tune, bit for bit.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..errors import ConfigError
from ..registry import Registry
from ..rounding import count

DELTA_METHODS: Registry[Callable[..., tuple[Tensor, float]]] = Registry("delta method")
MERGE_METHODS: Registry[Callable[..., Tensor]] = Registry("merge method")


@dataclass(frozen=True)
class DeltaParams:
    """``drop``: the fraction of delta entries removed, in [0, 1). ``q``: DAREx-q's rescaling
    denominator (survivors are scaled by 1/q instead of DARE's 1/(1-drop)), in (0, 1]."""

    drop: float = 0.9
    q: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.drop < 1.0 or math.isnan(self.drop):
            raise ConfigError(f"drop {self.drop} is outside [0, 1): it is the fraction of delta entries removed "
                              "(0.9 keeps one in ten); 1 would remove the whole fine-tune")
        if self.q is not None and not 0.0 < self.q <= 1.0:
            raise ConfigError(f"q {self.q} is outside (0, 1]: DAREx-q scales survivors by 1/q, between DARE's "
                              f"1/(1-drop) (q = 1-drop) and no rescaling (q = 1)")


@dataclass(frozen=True)
class MergeParams:
    """``drop``: fraction of each delta trimmed before merging (TIES: by magnitude; DARE-TIES:
    at random, survivors rescaled); ``scale``: λ, the factor of the merged delta."""

    drop: float = 0.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        DeltaParams(self.drop)  # the same range check and message
        if not math.isfinite(self.scale):
            raise ConfigError(f"scale {self.scale} must be a finite number (the factor of the merged delta, λ)")


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype deltas of ``dtype`` tensors are computed in (exact round trips)."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def generator_for(seed: int, name: str) -> torch.Generator:
    """A generator per (seed, tensor name): random masks do not depend on the order tensors
    are visited in, nor on how the checkpoint is sharded."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


def random_keep(shape: torch.Size, drop: float, generator: torch.Generator) -> Tensor:
    """Each entry survives independently with probability 1 − drop."""
    if drop == 0.0:
        return torch.ones(shape, dtype=torch.bool)
    return torch.rand(shape, generator=generator) >= drop


def magnitude_keep(delta: Tensor, drop: float) -> Tensor:
    """Keep the ``n − count(drop, n)`` entries of largest |delta| (equal magnitudes at the
    threshold: whichever ``torch.topk`` returns, deterministic on one device)."""
    n = delta.numel()
    keep_n = n - count(drop, n)
    keep = torch.zeros(n, dtype=torch.bool)
    if keep_n:
        keep[torch.topk(delta.abs().reshape(-1), keep_n, sorted=False).indices] = True
    return keep.reshape(delta.shape)


#: elements processed at once where the math is elementwise: the float64 temporaries of a
#: chunk stay small whatever the tensor (an embedding of 128k x 4096 included)
CHUNK = 1 << 20


def chunks(n: int) -> list[slice]:
    return [slice(i, min(i + CHUNK, n)) for i in range(0, n, CHUNK)]


def delta32(base: Tensor, finetuned: Tensor) -> Tensor:
    """The delta in float32, for the methods that rank or only shape it."""
    return finetuned.float() - base.float()


def patch(base: Tensor, finetuned: Tensor, keep: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """The pruned fine-tune ``base + scale · keep ⊙ (finetuned − base)`` in ``base``'s dtype,
    and the mask of entries where it differs from ``base``.

    Entries kept with ``scale == 1`` are copied from ``finetuned``; the rest are computed in
    :func:`working_dtype`, chunk by chunk. Where the delta is zero the base value is kept as
    is (so a -0.0 in the base stays -0.0), which makes "base + the stored entries"
    reproduce this tensor bit for bit."""
    wd = working_dtype(base.dtype)
    out = base.clone()
    mask = torch.zeros(base.shape, dtype=torch.bool)
    b, f, k, o, m = (t.reshape(-1) for t in (base, finetuned, keep, out, mask))  # views, (n,)
    copy = scale == 1.0 and finetuned.dtype == base.dtype
    for s in chunks(b.numel()):
        bw = b[s].to(wd)
        d = f[s].to(wd) - bw  # (c,)
        ms = k[s] & (d != 0)
        m[s] = ms
        o[s][ms] = f[s][ms] if copy else (bw[ms] + d[ms] * scale).to(base.dtype)
    return out, mask


DAREX_NEEDS_Q = ("darex needs q: survivors are scaled by 1/q, between DARE's 1/(1-drop) (q = 1-drop) and none "
                 "(q = 1); give --q Q, or choose it on data with prunekit.delta.choose_q")


# ---------------------------------------------------------------- delta methods
@DELTA_METHODS.register("dare", paper="Yu et al. 2024, Language Models are Super Mario: Absorbing Abilities from "
                                      "Homologous Models as a Free Lunch (DARE)", params=DeltaParams)
def dare(delta: Tensor, params: DeltaParams, generator: torch.Generator) -> tuple[Tensor, float]:
    """Random drop with probability p, survivors times 1/(1-p).

    The rescaling keeps the expected delta unchanged."""
    return random_keep(delta.shape, params.drop, generator), 1.0 / (1.0 - params.drop)


@DELTA_METHODS.register("darex", paper="Deng et al. 2025, DARE the Extreme: Revisiting Delta-Parameter Pruning for "
                                       "Fine-Tuned Models (DAREx-q)", params=DeltaParams)
def darex(delta: Tensor, params: DeltaParams, generator: torch.Generator) -> tuple[Tensor, float]:
    """DARE's random drop with survivors times 1/q.

    With 1-p < q <= 1 the factor stays tame at high drop rates, where 1/(1-p) overshoots."""
    if params.q is None:
        raise ConfigError(DAREX_NEEDS_Q)
    return random_keep(delta.shape, params.drop, generator), 1.0 / params.q


@DELTA_METHODS.register("drop", paper="Yu et al. 2024, Language Models are Super Mario (DARE's drop-only ablation)",
                        params=DeltaParams)
def drop_only(delta: Tensor, params: DeltaParams, generator: torch.Generator) -> tuple[Tensor, float]:
    """Random drop with probability p, no rescaling.

    The control DARE improves on."""
    return random_keep(delta.shape, params.drop, generator), 1.0


@DELTA_METHODS.register("magnitude", params=DeltaParams)
def magnitude(delta: Tensor, params: DeltaParams, generator: torch.Generator) -> tuple[Tensor, float]:
    """Keep the largest 1-p of each tensor's |delta|, unscaled."""
    return magnitude_keep(delta, params.drop), 1.0


@DELTA_METHODS.register("ties", paper="Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models "
                                      "(TIES)", params=DeltaParams)
def ties_trim(delta: Tensor, params: DeltaParams, generator: torch.Generator) -> tuple[Tensor, float]:
    """TIES's trim: keep the top 1-p of |delta| per tensor.

    For one fine-tune, sign election changes nothing: this is ``magnitude``."""
    return magnitude_keep(delta, params.drop), 1.0


# ---------------------------------------------------------------- merge methods
def _disjoint_mean(trimmed: Tensor, weights: Tensor) -> Tensor:
    """TIES's elect + disjoint merge: the sign of the weighted total mass wins per entry, and
    the entries that agree with it are averaged with their weights. ``trimmed``: (k, ...)."""
    w = weights.reshape(-1, *([1] * (trimmed.dim() - 1)))  # (k, 1, ...)
    elected = torch.sign((w * trimmed).sum(0))  # (...)
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)  # (k, ...)
    total = (w * agree).sum(0)
    merged = (w * trimmed * agree).sum(0) / total.clamp_min(torch.finfo(trimmed.dtype).tiny)
    return torch.where(total > 0, merged, torch.zeros_like(merged))


@MERGE_METHODS.register("task_arithmetic", paper="Ilharco et al. 2023, Editing Models with Task Arithmetic",
                        params=MergeParams)
def task_arithmetic(deltas: Tensor, weights: Tensor) -> Tensor:
    """The weighted sum of the deltas (task vectors).

    With weights 1/k it is the plain average of the fine-tunes. Nothing is trimmed."""
    return (weights.reshape(-1, *([1] * (deltas.dim() - 1))) * deltas).sum(0)


@MERGE_METHODS.register("ties", paper="Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models "
                                      "(TIES)", params=MergeParams)
def ties(deltas: Tensor, weights: Tensor) -> Tensor:
    """Trim by magnitude, elect signs, average agreeing entries.

    The trim (``magnitude`` per fine-tune, see :data:`MERGE_TRIM`) runs first, on whole
    tensors; this is the elect + disjoint merge, elementwise."""
    return _disjoint_mean(deltas, weights)


@MERGE_METHODS.register("dare_ties", paper="Yu et al. 2024, Language Models are Super Mario (DARE) with Yadav et "
                                           "al. 2023, TIES-Merging", params=MergeParams)
def dare_ties(deltas: Tensor, weights: Tensor) -> Tensor:
    """DARE each delta, then TIES's sign election and mean.

    The trim is ``dare`` (random drop, survivors x 1/(1-p)), see :data:`MERGE_TRIM`."""
    return _disjoint_mean(deltas, weights)


#: the delta method each merge trims every fine-tune's delta with first (None: no trim)
MERGE_TRIM = {"task_arithmetic": None, "ties": "magnitude", "dare_ties": "dare"}


#: the weights each merge method takes by default for k fine-tunes
def default_weights(method: str, k: int) -> list[float]:
    """1/k for task arithmetic (the average of the fine-tunes); 1 for the TIES family, whose
    disjoint mean normalises by the weights of the agreeing models."""
    return [1.0 / k] * k if method == "task_arithmetic" else [1.0] * k


__all__ = ["DAREX_NEEDS_Q", "DELTA_METHODS", "MERGE_METHODS", "MERGE_TRIM", "DeltaParams", "MergeParams", "chunks",
           "delta32", "default_weights", "generator_for",
           "magnitude_keep", "patch", "random_keep", "working_dtype"]

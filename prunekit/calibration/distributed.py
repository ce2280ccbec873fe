"""Data-parallel calibration over ``torch.distributed`` (``torchrun``; gloo on CPUs, NCCL on GPUs).

Inside an initialised process group the sequential runner shards the calibration batches
across ranks (contiguous runs of batches, rank order), and every group of target layers is
visited with the statistics of *all* ranks' tokens: each rank's accumulator (token count, sums
of squares or ``X^T X`` in float32, float64 means and centred moments) is gathered and merged
in rank order, so every rank holds bit-identical statistics and computes the same mask and the
same SparseGPT update. That the ranks agree is checked, not assumed: before each visit the
ranks compare the layers they are about to prune, and after it a float64 checksum of every
pruned weight; a mismatch stops every rank with an error naming it, never a silent divergence
or a hang. Hidden states stay on the rank that computed them (each rank propagates its shard
through the pruned block), so the forwards, which dominate calibration, split across ranks.

What this costs against one process: the statistics are summed in another order (float32
sums differ in their last bits), so weights agree to float tolerance and masks are the same
except at exact score ties. What is not data-parallel yet, and refused by name: gradient
scores, structural stages, training stages, and blocks whose layers are reached in a
data-dependent order (an MoE's experts): the ranks' layer sequences would differ.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..errors import PrunekitError
from .stats import InputStats


class DistributedError(PrunekitError):
    """Ranks disagree, or a feature that is not data-parallel was asked of several ranks."""


def active() -> bool:
    """Whether this process is one rank of an initialised group of more than one."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if active() else 1


def init_from_env(timeout_s: float = 1800.0) -> bool:
    """Join the process group ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1),
    NCCL when CUDA is available else gloo; whether this process is now one of several ranks."""
    if active() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return active()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return True


def refuse(what: str) -> None:
    """Raise when ``what`` runs on several ranks (it is not data-parallel yet)."""
    if active():
        raise DistributedError(f"{what} is not data-parallel yet: it would compute on one rank's shard of the "
                               f"calibration data as if it were all of it; run it in one process (without torchrun)")


def shard_bounds(n: int, ranks: int, r: int) -> tuple[int, int]:
    """Rank ``r``'s contiguous share ``[start, end)`` of ``n`` items (the first ``n % ranks``
    ranks take one more)."""
    base, extra = divmod(n, ranks)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def shard(batches: list[Any]) -> list[Any]:
    """This rank's batches; an error when there are fewer batches than ranks."""
    n, size = len(batches), world_size()
    if n < size:
        raise DistributedError(f"{n} calibration batches cannot be shared by {size} ranks (each needs at least "
                               f"one); lower --batch-size or raise --nsamples to at least {size} batches")
    start, end = shard_bounds(n, size, rank())
    return batches[start:end]


def _gather(t: Tensor) -> list[Tensor]:
    device = t.device
    if torch.distributed.get_backend() == "nccl" and device.type != "cuda":
        t = t.cuda()
    out = [torch.empty_like(t) for _ in range(world_size())]
    torch.distributed.all_gather(out, t.contiguous())
    return [x.to(device) for x in out]


def agree(value: Any, what: str) -> None:
    """Every rank passes its ``value`` (picklable); unless all are equal, every rank raises."""
    values: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(values, value)
    if any(v != values[0] for v in values[1:]):
        shown = ", ".join(f"rank {i}: {v!r}"[:200] for i, v in enumerate(values))
        raise DistributedError(f"the ranks disagree on {what} ({shown}); data-parallel calibration needs every rank "
                               "to reach the same layers in the same order (an MoE's routing is data-dependent); "
                               "run it in one process")


def reduce_stats(stats: InputStats) -> InputStats:
    """The statistics of every rank's tokens, merged in rank order (identical on every rank)."""
    parts = {"tokens": _gather(torch.tensor([stats.tokens], dtype=torch.float64, device=stats.device))}
    for name in ("gram", "sq", "mean", "m2"):
        value = getattr(stats, name)
        if value is not None:
            parts[name] = _gather(value)
    merged = InputStats.like(stats)
    for r in range(world_size()):
        one = InputStats.like(stats)
        one.tokens = int(parts["tokens"][r].item())
        for name in ("gram", "sq", "mean", "m2"):
            if name in parts:
                setattr(one, name, parts[name][r])
        merged.merge(one)
    return merged


def checksum(model: nn.Module, names: list[str]) -> list[float]:
    """Float64 sums of the named layers' weights (the same on every rank when they agree)."""
    return [float(model.get_submodule(n).weight.detach().double().sum()) for n in names]


Visitor = Callable[[list[str], InputStats], None]


def reducing(visit: Visitor, model: nn.Module) -> Visitor:
    """``visit`` with the ranks agreeing on the group, its statistics merged across ranks, and
    the pruned weights checked equal on every rank afterwards."""
    def visit_all(names: list[str], stats: InputStats) -> None:
        agree(list(names), "the next layers to prune")
        merged = reduce_stats(stats)
        visit(names, merged)
        agree(checksum(model, names), f"the weights of {names[0]} after pruning (ranks computed different masks)")

    return visit_all


__all__ = ["DistributedError", "active", "agree", "checksum", "init_from_env", "rank", "reduce_stats", "reducing",
           "refuse", "shard", "shard_bounds", "world_size"]

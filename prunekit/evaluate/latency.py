"""CPU/GPU latency of forward passes, measured so that ratios between models are fair."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch
from torch import nn


@torch.inference_mode()
def latencies_ms(models: dict[str, nn.Module], make_input: Callable[[], Any], repeats: int = 20, inner: int = 1,
                 warmup: int = 3, stat: Callable[[list[float]], float] | None = statistics.median) -> dict[str, Any]:
    """Milliseconds per forward of each model: ``stat`` (median by default) over ``repeats``.

    Rounds are interleaved across models, so a change in machine load hits all of them
    alike and their ratios stay meaningful on a shared machine. ``make_input()`` returns
    the forward's positional argument or a dict of keyword arguments; ``stat=None`` returns
    every repeat.
    """
    x = make_input()
    call = (lambda m: m(**x)) if isinstance(x, dict) else (lambda m: m(x))
    for m in models.values():
        m.eval()
        for _ in range(warmup):
            call(m)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(repeats):
        for k, m in models.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(inner):
                call(m)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[k].append((time.perf_counter() - t) / inner * 1e3)
    return {k: stat(v) for k, v in times.items()} if stat else times

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


#: the width multiples :func:`fast_multiple` chooses among
MULTIPLES = (1, 8, 16, 32, 64, 128)


@torch.inference_mode()
def matmul_us_per_column(widths: list[int], inner: int, tokens: int, device: Any, dtype: torch.dtype,
                         repeats: int = 7) -> dict[int, float]:
    """Microseconds per output column of ``x (tokens, inner) @ W^T (inner, width)`` for each
    width: the median of ``repeats`` interleaved rounds (a busy machine slows all alike)."""
    x = torch.randn(tokens, inner, device=device, dtype=dtype)
    weights = {w: torch.randn(w, inner, device=device, dtype=dtype) for w in widths}
    times: dict[int, list[float]] = {w: [] for w in widths}
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(2):  # warm-up
        for w in widths:
            x @ weights[w].T
    for _ in range(repeats):
        for w in widths:
            sync()
            t = time.perf_counter()
            for _ in range(3):
                x @ weights[w].T
            sync()
            times[w].append((time.perf_counter() - t) / 3 * 1e6 / w)
    return {w: statistics.median(v) for w, v in times.items()}


def fast_multiple(width: int, inner: int, device: Any = "cpu", dtype: torch.dtype = torch.float32,
                  tokens: int = 256, tolerance: float = 0.05) -> tuple[int, dict[int, float]]:
    """The smallest width multiple in :data:`MULTIPLES` at which a matmul runs as fast per
    column as at widths that are multiples of 128, measured on ``device``: widths just below
    ``width`` that are multiples of exactly each candidate (``base - m`` for a ``base`` divisible
    by 256) are timed beside ``base``; the first ``m`` whose width and every larger candidate's
    come within ``tolerance`` of ``base`` per column wins. Returns it with the timings."""
    base = max(256, width // 256 * 256)
    widths = sorted({base, *(base - m for m in MULTIPLES)})
    per_col = matmul_us_per_column(widths, inner, tokens, device, dtype)
    ref = per_col[base]
    chosen = MULTIPLES[-1]
    for i, m in enumerate(MULTIPLES):
        if all(per_col[base - mm] <= ref * (1 + tolerance) for mm in MULTIPLES[i:]):
            chosen = m
            break
    return chosen, {w: round(v, 4) for w, v in per_col.items()}

"""What a token stage costs in quality, measured against the same model with it switched off:
for a decoder, the perplexity of a continuation after a cut prompt (the prompt runs as one
prefill, the continuation through its KV cache, as ``generate`` would run it); for an encoder,
the cosine between size-weighted mean embeddings."""
from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .handle import Handle
from .select import weighted_mean


def _cache_arg(model: nn.Module) -> str:
    """``cache`` in transformers 5, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def continuation_nll(model: nn.Module, prompt: Tensor, continuation: Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of ``continuation`` ``(B, t)`` after a prefill of
    ``prompt`` ``(B, n)`` (float64 sum, and the number of tokens): the prompt's last logits
    predict the first continuation token, the continuation's own logits the rest."""
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        cache = out.get("cache", None) or out.get("past_key_values", None)  # transformers 5 names it cache
        rest = model(input_ids=continuation, **{_cache_arg(model): cache}).logits if continuation.shape[1] > 1 else None
    logits = out.logits[:, -1:] if rest is None else torch.cat([out.logits[:, -1:], rest[:, :-1]], 1)  # (B, t, V)
    nll = F.cross_entropy(logits.flatten(0, 1).float(), continuation.flatten().to(logits.device), reduction="sum")
    return float(nll.double()), continuation.numel()


def continuation_perplexity(handle: Handle, windows: Tensor, prompt_fraction: float = 0.5) -> dict[str, Any]:
    """Continuation perplexity over ``windows`` ``(W, L)``, one window at a time: each window's
    first ``prompt_fraction`` is the prompt, the rest the continuation; with the cut and without."""
    split = max(1, min(windows.shape[1] - 1, round(prompt_fraction * windows.shape[1])))
    totals = {"cut": [0.0, 0], "uncut": [0.0, 0]}
    device = next(handle.model.parameters()).device
    before = handle.enabled
    try:
        for row in windows:
            ids = row[None].to(device)  # (1, L)
            for name, on in (("cut", True), ("uncut", False)):
                handle.enabled = on
                nll, n = continuation_nll(handle.model, ids[:, :split], ids[:, split:])
                totals[name][0] += nll
                totals[name][1] += n
    finally:
        handle.enabled = before
    return {"continuation_perplexity": math.exp(totals["cut"][0] / totals["cut"][1]),
            "uncut_continuation_perplexity": math.exp(totals["uncut"][0] / totals["uncut"][1]),
            "prompt_tokens": split, "continuation_tokens": windows.shape[1] - split, "windows": windows.shape[0]}


def embedding_cosine(handle: Any, inputs: dict[str, Tensor]) -> float | None:
    """Mean cosine between the size-weighted mean of the last hidden states with the method on
    and off (``inputs``: an encoder's keyword arguments, with ``attention_mask`` when padded);
    None for a model whose output has no ``last_hidden_state`` (a classifier)."""
    before = handle.enabled
    try:
        with torch.no_grad():
            handle.enabled = False
            dense = getattr(handle.model(**inputs), "last_hidden_state", None)  # (B, N, d)
            if dense is None:
                return None
            mask = inputs.get("attention_mask")
            sizes = mask.float() if mask is not None else torch.ones(dense.shape[:2], device=dense.device)
            handle.enabled = True
            cut = handle.model(**inputs).last_hidden_state  # (B, N', d)
    finally:
        handle.enabled = before
    return float(F.cosine_similarity(weighted_mean(cut, handle.sizes), weighted_mean(dense, sizes), dim=-1).mean())


__all__ = ["continuation_nll", "continuation_perplexity", "embedding_cosine"]

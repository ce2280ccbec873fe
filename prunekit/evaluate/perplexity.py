"""Perplexity on non-overlapping windows: exp(mean next-token NLL over every predicted token)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import DataError


@dataclass(frozen=True)
class Perplexity:
    perplexity: float | None  # None if the model produced NaN/Inf
    nll: float  # mean negative log-likelihood per predicted token
    tokens: int  # tokens evaluated (windows * seqlen)
    windows: int


@torch.no_grad()
def perplexity(model: nn.Module, ids: Tensor, seqlen: int = 512, max_tokens: int | None = None,
               progress: bool = True) -> Perplexity:
    """Split (tokens,) ``ids`` into windows of ``seqlen`` (the tail is dropped) and score each.

    Each window predicts its tokens 2..seqlen, as ``model(ids, labels=ids)`` does.
    """
    if max_tokens is not None:
        ids = ids[:max_tokens]
    windows = ids.numel() // seqlen
    if windows == 0:
        raise DataError(f"the text has {ids.numel()} tokens, fewer than one window of --seqlen {seqlen}")
    device = next(model.parameters()).device
    batch = ids[: windows * seqlen].view(windows, seqlen).to(device)  # (windows, seqlen)
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for w in tqdm(range(windows), desc="perplexity", disable=not progress, leave=False):
            x = batch[w : w + 1]  # (1, seqlen)
            logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()  # (seqlen-1, vocab)
            total += float(F.cross_entropy(logits, x[0, 1:], reduction="sum"))
    finally:
        model.train(was_training)
    nll = total / (windows * (seqlen - 1))
    ppl = math.exp(nll) if math.isfinite(nll) and nll < 700 else None
    return Perplexity(ppl, nll, windows * seqlen, windows)

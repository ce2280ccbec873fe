"""Scores of text examples under a causal language model, for pruning fine-tuning data.

- :func:`lm_loss`: each example's mean token negative log-likelihood (high = hard).
- :func:`ifd`: instruction-following difficulty (Li et al. 2024, From Quantity to Quality:
  Boosting LLM Performance with Self-Guided Data Selection for Instruction Tuning; arXiv
  2023): ``PPL(response | instruction) / PPL(response)``. Near or above 1 when the instruction
  does not help predict the response; Li et al. keep the highest ratios below 1.

Works with any Hugging Face causal LM (``model(input_ids, attention_mask).logits``) and its
tokenizer. Examples are batched (right-padded, the padding masked out), run on the model's
device without autograd, and only the per-example means come back to the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError


@dataclass(frozen=True)
class LanguageModel:
    """The LM text scores run: ``model`` (a causal LM), ``tokenizer`` (its tokenizer),
    ``batch_size`` examples per forward, ``max_length`` tokens kept per example."""

    model: nn.Module
    tokenizer: Any
    batch_size: int = 8
    max_length: int = 512

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_length < 2:
            raise ConfigError(f"batch_size {self.batch_size} and max_length {self.max_length}: need batch_size >= 1 "
                              "and max_length >= 2 (one token predicted from another)")


def _token_nll(model: nn.Module, ids: list[list[int]], scored_from: list[int], pad: int) -> Tensor:
    """Mean NLL of the tokens at positions ``scored_from[i]`` onward of each sequence. -> (B,) float32"""
    device = next(model.parameters()).device
    width = max(len(s) for s in ids)
    x = torch.full((len(ids), width), pad, dtype=torch.long)  # (B, L)
    attn = torch.zeros(len(ids), width, dtype=torch.long)  # (B, L)
    for i, s in enumerate(ids):
        x[i, : len(s)], attn[i, : len(s)] = torch.tensor(s), 1
    x, attn = x.to(device), attn.to(device)
    logits = model(input_ids=x, attention_mask=attn).logits[:, :-1].float()  # (B, L-1, V): predicts token t+1
    nll = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")  # (B, L-1)
    pos = torch.arange(1, width, device=device).unsqueeze(0)  # position of each predicted token
    start = torch.tensor(scored_from, device=device).clamp_min(1).unsqueeze(1)  # (B, 1)
    scored = (pos >= start) & attn[:, 1:].bool()  # (B, L-1)
    return ((nll * scored).sum(1) / scored.sum(1).clamp_min(1)).cpu()


def _encode(tokenizer, prefix: str, text: str, max_length: int, where: int) -> tuple[list[int], int]:
    """Token ids ``[bos] + prefix + text`` (cut to ``max_length``) and where ``text`` starts."""
    if not isinstance(text, str) or not text:
        raise DataError(f"example {where}: the text to score must be a non-empty string, got {text!r}")
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    p = tokenizer(prefix, add_special_tokens=False).input_ids if prefix else []
    t = tokenizer(text, add_special_tokens=False).input_ids
    if not t:
        raise DataError(f"example {where}: {text!r} has no tokens to score")
    seq = (bos + p + t)[:max_length]
    return seq, min(len(bos) + len(p), len(seq) - 1)


def _batched(lm: LanguageModel, pieces: Sequence[tuple[str, str]], progress: bool, desc: str) -> Tensor:
    if len(pieces) == 0:
        raise DataError("no text examples to score")
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (getattr(tok, "eos_token_id", None) or 0)
    out, was = [], lm.model.training
    lm.model.eval()
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(pieces), lm.batch_size), desc=desc, unit="batch", disable=not progress,
                              leave=False):
                batch = [_encode(tok, p, t, lm.max_length, start + j)
                         for j, (p, t) in enumerate(pieces[start: start + lm.batch_size])]
                out.append(_token_nll(lm.model, [b[0] for b in batch], [b[1] for b in batch], pad))
    finally:
        lm.model.train(was)
    return torch.cat(out)


def _pairs(examples: Sequence[Any]) -> list[tuple[str, str]]:
    out = []
    for i in range(len(examples)):
        item = examples[i]
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise DataError(f"ifd scores (instruction, response) pairs; example {i} is {type(item).__name__}. "
                            "For plain texts use lm_loss")
        out.append((str(item[0]), item[1]))
    return out


def lm_loss(model: nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int = 8, max_length: int = 512,
            progress: bool = True) -> Tensor:
    """(N,) mean token NLL of each text under a causal LM (high = hard for the model)."""
    lm = LanguageModel(model, tokenizer, batch_size, max_length)
    return _batched(lm, [("", texts[i]) for i in range(len(texts))], progress, "lm loss")


def ifd(model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], *, batch_size: int = 8,
        max_length: int = 512, progress: bool = True) -> Tensor:
    """(N,) IFD = PPL(response | instruction) / PPL(response) of (instruction, response) pairs."""
    lm, both = LanguageModel(model, tokenizer, batch_size, max_length), _pairs(pairs)
    conditioned = _batched(lm, both, progress, "ifd (conditioned)")  # (N,) mean NLL of the response
    alone = _batched(lm, [("", r) for _, r in both], progress, "ifd (alone)")  # (N,)
    return torch.exp(conditioned - alone)


__all__ = ["LanguageModel", "ifd", "lm_loss"]

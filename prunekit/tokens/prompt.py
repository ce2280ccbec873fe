"""Which prompt tokens a decoder keeps, pure tensor functions: FastV's ranking by the attention
the last prompt token pays (Chen et al. 2024, "An Image is Worth 1/2 Tokens After Layer 2:
Plug-and-Play Inference Acceleration for Large Vision-Language Models"), DivPrune's max-min
diversity subset (Alvar et al. 2025, "DivPrune: Diversity-based Visual Token Pruning for Large
Multimodal Models") and the random control.

Every selector returns sorted indices ``(B, k)`` that always contain the last prompt token
(index ``N - 1``): the next token is predicted from it, and a generation continues from it.
Tokens are only dropped, never merged, so every kept token keeps its own key, value and
position, and the KV cache stays what the model itself would have cached for them.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError


def _check_k(k: int, n: int) -> None:
    if not 1 <= k <= n:
        raise ConfigError(f"cannot keep k={k} of {n} prompt tokens; use 1 <= k <= {n} (the last token is always kept)")


def _with_last(ranked: Tensor, k: int, n: int) -> Tensor:
    """The last token, then the first ``k - 1`` of ``ranked`` ``(B, N - 1)`` (indices of the
    other tokens, best first), sorted: ``(B, k)``."""
    last = torch.full((ranked.shape[0], 1), n - 1, dtype=ranked.dtype, device=ranked.device)
    return torch.cat([ranked[:, : k - 1], last], dim=1).sort(dim=1).values


def last_token_attention(attn: Tensor) -> Tensor:
    """``(B, H, q, N)`` attention probabilities of one layer -> ``(B, N)``: what the last query
    pays each key, averaged over heads (FastV's score), in float32."""
    return attn[:, :, -1, :].float().mean(1)


def fastv_keep(score: Tensor, k: int) -> Tensor:
    """FastV: the last token and the ``k - 1`` tokens it attends to most (ties to the earlier
    token). ``score``: ``(B, N)`` from :func:`last_token_attention`. Returns ``(B, k)``, sorted."""
    b, n = score.shape
    _check_k(k, n)
    ranked = score[:, : n - 1].argsort(dim=1, descending=True, stable=True)  # (B, N - 1)
    return _with_last(ranked, k, n)


def cosine_distance(x: Tensor) -> Tensor:
    """``(B, N, d)`` -> ``(B, N, N)`` pairwise ``1 - cos``, in float32."""
    unit = torch.nn.functional.normalize(x.float(), dim=-1)  # (B, N, d)
    return 1.0 - unit @ unit.transpose(1, 2)


def divprune_keep(x: Tensor, k: int) -> Tensor:
    """DivPrune's greedy answer to the max-min diversity problem over the tokens' features.

    ``x``: ``(B, N, d)`` hidden states of the prompt, ``D`` their cosine distances. Each pick
    is the token whose distance to the nearest token already picked is largest, so the subset
    spreads over the prompt's features. The paper starts from the token farthest from its own
    nearest neighbour; here the last token, which is always kept, is the first pick, and the
    rest are chosen to be far from it and from each other. Ties go to the earlier token.
    Returns ``(B, k)``, sorted. Cost: ``O(N^2 d)`` for ``D`` and ``O(k N)`` for the picks."""
    b, n, _ = x.shape
    _check_k(k, n)
    dist = cosine_distance(x)  # (B, N, N)
    rows = torch.arange(b, device=x.device)
    picked = torch.zeros(b, n, dtype=torch.bool, device=x.device)
    picked[:, n - 1] = True
    nearest = dist[:, n - 1, :].clone()  # (B, N): distance of each token to the nearest pick
    for _ in range(k - 1):
        gain = nearest.masked_fill(picked, -1.0)  # distances are >= 0, so a picked token never wins
        best = gain.argmax(dim=1)  # (B,): argmax takes the first of equal values
        picked[rows, best] = True
        nearest = torch.minimum(nearest, dist[rows, best])
    return picked.nonzero()[:, 1].view(b, k)  # nonzero lists each row's picks in order


def random_prompt_keep(b: int, n: int, k: int, generator: torch.Generator | None = None,
                       device: torch.device | str = "cpu") -> Tensor:
    """The control: the last token and ``k - 1`` others drawn uniformly per row, ``(B, k)``, sorted."""
    _check_k(k, n)
    ranked = torch.rand(b, n - 1, generator=generator, device=device).argsort(dim=1)  # (B, N - 1)
    return _with_last(ranked, k, n)


__all__ = ["cosine_distance", "divprune_keep", "fastv_keep", "last_token_attention", "random_prompt_keep"]

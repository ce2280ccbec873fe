"""Token merging, pure tensor functions: ToMe's bipartite soft matching with size-weighted
averages, and the attention bias that keeps attention consistent with merged and removed
tokens (Bolya et al. 2023, "Token Merging: Your ViT But Faster").

Bipartite soft matching splits the tokens alternately into sets A (even positions) and B (odd
positions), joins every A token to its most similar B token (cosine of the metric, the keys
averaged over heads), and merges the ``r`` A tokens with the most similar partners into them.
One round can merge at most the A tokens, about half; :func:`merge_tokens` runs rounds until
``n`` tokens are gone. [CLS] (position 0, in A) is never merged.

Padding (size 0, see :mod:`prunekit.tokens.select`) merges first, into padding where it can:
a size-0 token leaves every size-weighted average unchanged, so these merges are free.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError
from .select import TINY, gather_tokens


def max_merge(n: int, protect_first: bool = True) -> int:
    """The most tokens one round of bipartite matching can merge out of ``n``: the A tokens
    (even positions, ``ceil(n / 2)``), less [CLS] when protected; 0 when B is empty."""
    if n < 2:
        return 0
    return (n + 1) // 2 - int(protect_first)


def match_scores(metric: Tensor, sizes: Tensor) -> Tensor:
    """Scores ``(B, Na, Nb)`` of joining A token i (position 2i) to B token j (position 2j + 1).

    ``metric``: ``(B, N, c)``; ``sizes``: ``(B, N)``. Between real tokens the cosine of their
    metrics (in [-1, 1]); padding in A scores 3 to padding in B and 2 to real tokens (above any
    cosine: padding merges first, into padding where it can); a real token scores -2 to padding
    in B (it joins a real token whenever one is left)."""
    m = metric.float()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(TINY)  # (B, N, c)
    scores = m[:, 0::2] @ m[:, 1::2].transpose(1, 2)  # (B, Na, Nb)
    pad_a, pad_b = (sizes[:, 0::2] <= 0)[:, :, None], (sizes[:, 1::2] <= 0)[:, None, :]  # (B, Na, 1), (B, 1, Nb)
    scores = scores.masked_fill(pad_b, -2.0)
    return torch.where(pad_a, 2.0 + pad_b.float(), scores)


def bipartite_merge(x: Tensor, metric: Tensor, r: int, sizes: Tensor,
                    protect_first: bool = True) -> tuple[Tensor, Tensor]:
    """One round of ToMe's bipartite soft matching: merge ``r`` tokens away.

    ``x``: ``(B, N, d)`` tokens; ``metric``: ``(B, N, c)`` what similarity is measured on (keys
    averaged over heads in ToMe); ``sizes``: ``(B, N)``; ``protect_first``: never merge token 0
    ([CLS]). Each of the ``r`` A tokens whose best B partner scores highest is added into it as
    a size-weighted average, ``(s_a x_a + s_b x_b) / (s_a + s_b)``, and the sizes add up. The
    tokens left keep their original order. Returns ``(B, N - r, d)`` and ``(B, N - r)``; the
    averages run in float32, tokens nothing merged into are returned bit for bit."""
    b, n, d = x.shape
    if not 0 <= r <= max_merge(n, protect_first):
        raise ConfigError(f"bipartite_merge: r={r} is more than one round can merge out of {n} tokens "
                          f"(at most {max_merge(n, protect_first)}); use merge_tokens for more")
    if r == 0:
        return x, sizes
    scores = match_scores(metric, sizes)  # (B, Na, Nb)
    best, partner = scores.max(dim=-1)  # (B, Na)
    start = int(protect_first)  # row 0 is [CLS]: it takes no part in the ranking
    order = best[:, start:].argsort(dim=1, descending=True, stable=True) + start  # (B, Na - start)
    src = 2 * order[:, :r]  # (B, r) positions of the A tokens merged away
    dst = 2 * partner.gather(1, order[:, :r]) + 1  # (B, r) positions of the B tokens they join
    weighted = x.float() * sizes.float()[..., None]  # (B, N, d)
    sums = weighted.scatter_add(1, dst[..., None].expand(-1, -1, d), gather_tokens(weighted, src))  # (B, N, d)
    new_sizes = sizes.scatter_add(1, dst, sizes.gather(1, src))  # (B, N)
    joined = torch.zeros(b, n, dtype=torch.bool, device=x.device).scatter(1, dst, True)  # (B, N)
    merged = torch.where(joined[..., None], sums / new_sizes.float().clamp_min(TINY)[..., None], x.float())
    merged = torch.where(joined[..., None], merged.to(x.dtype), x)  # untouched tokens: exactly as they came
    position = torch.arange(n, device=x.device).expand(b, n).scatter(1, src, n)  # merged-away tokens sort last
    left = position.sort(dim=1).values[:, : n - r]  # (B, N - r) positions left, in order
    return gather_tokens(merged, left), new_sizes.gather(1, left)


def merge_tokens(x: Tensor, metric: Tensor, n_remove: int, sizes: Tensor,
                 protect_first: bool = True) -> tuple[Tensor, Tensor]:
    """Remove ``n_remove`` tokens by rounds of :func:`bipartite_merge` (each merges as many as it
    can, at most about half of the tokens), the metric merged along with the tokens (a size-
    weighted average, as ToMe's ``merge_wavg`` does for the tokens). Shapes as there."""
    n_tokens = x.shape[1]
    if not 0 <= n_remove <= n_tokens - 1 - int(protect_first):
        raise ConfigError(f"merge_tokens: cannot remove {n_remove} of {n_tokens} tokens "
                          f"(at most {n_tokens - 1 - int(protect_first)}: one token besides [CLS] is left)")
    d = x.shape[-1]
    while n_remove > 0:
        r = min(n_remove, max_merge(x.shape[1], protect_first))
        if r == n_remove:  # the last round
            return bipartite_merge(x, metric, r, sizes, protect_first)
        both, sizes = bipartite_merge(torch.cat([x, metric.to(x.dtype)], dim=-1), metric, r, sizes, protect_first)
        x, metric, n_remove = both[..., :d], both[..., d:], n_remove - r
    return x, sizes


def attention_bias(sizes: Tensor, proportional: bool, dtype: torch.dtype) -> Tensor:
    """Additive attention logits per key, ``(B, N)`` -> ``(B, N)`` in ``dtype``.

    With ``proportional`` attention (ToMe, Eq. 1) a token of size s gets ``log s``: it draws the
    attention its s merged tokens would have drawn together. Otherwise 0. Padding (size 0) gets
    the most negative value of ``dtype``, as Hugging Face masks do."""
    floor = torch.finfo(dtype).min
    logs = sizes.float().clamp_min(TINY).log() if proportional else torch.zeros_like(sizes, dtype=torch.float32)
    return torch.where(sizes > 0, logs, torch.full_like(logs, floor)).to(dtype)


__all__ = ["attention_bias", "bipartite_merge", "match_scores", "max_merge", "merge_tokens"]

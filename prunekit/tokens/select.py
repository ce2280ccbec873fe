"""Token selection at inference, pure tensor functions: the [CLS] attention score and top-k
keep with fusion of EViT (Liang et al. 2022, "Not All Patches are What You Need: Expediting
Vision Transformers via Token Reorganizations"), the random control, and size-weighted pooling.

Every token carries a *size*: how many input tokens it stands for (1 at the start, the sum of
its parts after a fusion or a merge). Padding has size 0, so one tensor is both the padding
mask (``sizes > 0``) and the weight of a size-weighted average: padding drops out of every
average and every pooled embedding without a separate mask to keep in step.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError

#: the smallest total weight divided by (all-padding fusions and merges give 0 / TINY = 0)
TINY = 1e-12


def cls_attention(q: Tensor, k: Tensor, bias: Tensor, scale: float) -> Tensor:
    """Attention the [CLS] query (token 0) pays each token, averaged over heads (EViT's score).

    ``q``, ``k``: ``(B, N, H, hd)`` queries and keys of one layer; ``bias``: ``(B, N)`` additive
    logit per key (0, ``log(size)`` under proportional attention, very negative for padding);
    ``scale``: the layer's logit scale (``hd ** -0.5``). Returns ``(B, N)``, rows summing to 1.
    Computed from q and k, so it works whether or not the model's attention returns its
    probabilities (SDPA does not)."""
    logits = torch.einsum("bhd,bnhd->bhn", q[:, 0].float(), k.float()) * scale  # (B, H, N)
    return (logits + bias.float()[:, None, :]).softmax(-1).mean(1)  # (B, N)


def evit_keep(cls_attn: Tensor, k: int) -> Tensor:
    """Indices ``(B, 1 + k)`` of the tokens EViT keeps: 0 ([CLS], always) then the ``k`` tokens
    [CLS] attends to most, in their original order (ties go to the earlier token).

    ``cls_attn``: ``(B, N)`` from :func:`cls_attention` (its column 0, [CLS] itself, is ignored).
    """
    b, n = cls_attn.shape
    if not 0 <= k <= n - 1:
        raise ConfigError(f"evit_keep: k={k} tokens cannot be kept out of the {n - 1} besides [CLS]; "
                          f"use 0 <= k <= {n - 1}")
    top = cls_attn[:, 1:].argsort(dim=1, descending=True, stable=True)[:, :k] + 1  # (B, k)
    first = torch.zeros(b, 1, dtype=top.dtype, device=top.device)
    return torch.cat([first, top.sort(dim=1).values], dim=1)  # (B, 1 + k)


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """``x[b, idx[b]]``: ``(B, N, d)`` gathered at ``idx (B, K)`` into ``(B, K, d)``."""
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def evit_fuse(x: Tensor, sizes: Tensor, cls_attn: Tensor, keep_idx: Tensor) -> tuple[Tensor, Tensor]:
    """EViT's token reorganization: keep the tokens ``keep_idx`` and fuse all the others into one
    token appended at the end.

    ``x``: ``(B, N, d)``; ``sizes``: ``(B, N)``; ``cls_attn``: ``(B, N)``; ``keep_idx``:
    ``(B, K)`` from :func:`evit_keep`. The fused token is the average of the others weighted by
    the attention [CLS] pays them (EViT's code sums them without dividing by the total weight;
    the average keeps the fused token on the scale of the others), and its size is the sum of
    theirs (0 when they were all padding: it stays masked). Returns ``(B, K + 1, d)`` and
    ``(B, K + 1)``. The weighted sum runs in float32."""
    b, n, d = x.shape
    others = torch.ones(b, n, dtype=torch.bool, device=x.device).scatter(1, keep_idx, False)  # (B, N)
    w = cls_attn.float() * others  # (B, N)
    total = w.sum(1, keepdim=True)  # (B, 1)
    # attention can underflow to 0 for every fused token: fall back on their sizes then
    w = torch.where(total > 0, w, sizes.float() * others)
    fused = (w[..., None] * x.float()).sum(1) / w.sum(1, keepdim=True).clamp_min(TINY)  # (B, d)
    fused_size = (sizes * others).sum(1, keepdim=True)  # (B, 1)
    out = torch.cat([gather_tokens(x, keep_idx), fused[:, None].to(x.dtype)], dim=1)  # (B, K + 1, d)
    return out, torch.cat([sizes.gather(1, keep_idx), fused_size], dim=1)


def random_keep(sizes: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """Indices ``(B, 1 + k)`` of the random control: 0 ([CLS]) then ``k`` tokens drawn uniformly,
    real tokens (size > 0) before padding, in their original order. ``sizes``: ``(B, N)``;
    ``generator``: on ``sizes``' device, for a draw that repeats under a seed."""
    b, n = sizes.shape
    if not 0 <= k <= n - 1:
        raise ConfigError(f"random_keep: k={k} tokens cannot be kept out of the {n - 1} besides [CLS]; "
                          f"use 0 <= k <= {n - 1}")
    score = torch.rand(b, n, generator=generator, device=sizes.device) + (sizes > 0)  # (B, N): real in [1, 2)
    score[:, 0] = 3.0  # [CLS] first
    top = score.argsort(dim=1, descending=True, stable=True)[:, : 1 + k]  # (B, 1 + k)
    return top.sort(dim=1).values


def weighted_mean(x: Tensor, sizes: Tensor) -> Tensor:
    """Size-weighted mean over tokens, ``(B, N, d)`` and ``(B, N)`` -> ``(B, d)``: the mean over
    the input tokens each token stands for (padding, size 0, left out). With sizes from the
    attention mask it is the usual masked mean pooling of sentence encoders."""
    w = sizes.to(x.dtype)[..., None]  # (B, N, 1)
    return (x * w).sum(1) / w.sum(1).clamp_min(TINY)


__all__ = ["TINY", "cls_attention", "evit_keep", "evit_fuse", "gather_tokens", "random_keep", "weighted_mean"]

"""The token methods, one registry: what a method does with a layer's output tokens once the
amount is known. Each entry is a :class:`TokenMethod`: its function, what it needs measured in
the layer (the [CLS] attention, the keys) and whether attention to its tokens is proportional
to their size."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..registry import Registry
from .merge import merge_tokens
from .select import evit_fuse, evit_keep, gather_tokens, random_keep


@dataclass(frozen=True)
class LayerTokens:
    """One layer's output as a method sees it. ``x``: ``(B, N, d)`` tokens; ``sizes``: ``(B, N)``
    (0 for padding); ``n_remove``: tokens to remove, ``1 <= n_remove <= N - 2``; ``cls_attn``:
    ``(B, N)`` attention [CLS] paid each token in this layer (when the method needs it);
    ``keys``: ``(B, N, hd)`` this layer's keys averaged over heads (when needed and reachable);
    ``generator``: for random methods, seeded once per forward."""

    x: Tensor
    sizes: Tensor
    n_remove: int
    cls_attn: Tensor | None = None
    keys: Tensor | None = None
    generator: torch.Generator | None = None


@dataclass(frozen=True)
class TokenMethod:
    """``fn(LayerTokens) -> (x (B, N - n_remove, d), sizes (B, N - n_remove))``, [CLS] first.
    ``needs``: what the layer must measure (``cls_attn``, ``keys``, ``generator``);
    ``proportional``: later layers add ``log(size)`` to the attention logits of its tokens."""

    fn: Callable[[LayerTokens], tuple[Tensor, Tensor]]
    needs: frozenset[str] = frozenset()
    proportional: bool = False


TOKEN_METHODS: Registry[TokenMethod] = Registry("token method", "token_methods")


def register_token_method(name: str, *, needs: tuple[str, ...] = (), proportional: bool = False,
                          paper: str = "") -> Callable[[Callable], Callable]:
    """Register ``fn`` as token method ``name`` (see :class:`TokenMethod`)."""
    def add(fn: Callable[[LayerTokens], tuple[Tensor, Tensor]]) -> Callable:
        TOKEN_METHODS.register(name, paper=paper)(TokenMethod(fn, frozenset(needs), proportional))
        return fn

    return add


@register_token_method("evit", needs=("cls_attn",), paper="Liang et al. 2022, Not All Patches are What You "
                       "Need: Expediting Vision Transformers via Token Reorganizations (EViT)")
def evit(t: LayerTokens) -> tuple[Tensor, Tensor]:
    """Keep what [CLS] attends to most, fuse the rest into one.

    Of the ``N`` tokens, [CLS], the ``N - 2 - n_remove`` most attended and the fused token stay."""
    keep_idx = evit_keep(t.cls_attn, t.x.shape[1] - 2 - t.n_remove)  # (B, N - 1 - n_remove)
    return evit_fuse(t.x, t.sizes, t.cls_attn, keep_idx)


@register_token_method("tome", needs=("keys",), proportional=True,
                       paper="Bolya et al. 2023, Token Merging: Your ViT But Faster (ToMe)")
def tome(t: LayerTokens) -> tuple[Tensor, Tensor]:
    """Merge similar tokens by bipartite soft matching on the keys.

    Size-weighted averages; the hidden states stand in for the keys where a layer has none."""
    metric = t.keys if t.keys is not None else t.x
    return merge_tokens(t.x, metric, t.n_remove, t.sizes)


@register_token_method("random", needs=("generator",))
def random_drop(t: LayerTokens) -> tuple[Tensor, Tensor]:
    """Drop random tokens, [CLS] kept (the control)."""
    idx = random_keep(t.sizes, t.x.shape[1] - 1 - t.n_remove, t.generator)  # (B, N - n_remove)
    return gather_tokens(t.x, idx), t.sizes.gather(1, idx)


__all__ = ["LayerTokens", "TokenMethod", "TOKEN_METHODS", "register_token_method"]

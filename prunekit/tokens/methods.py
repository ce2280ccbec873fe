"""The token methods, one registry: what a method does with a layer's tokens once the amount
is known. Each entry is a :class:`TokenMethod`: for encoders, ``fn`` reduces a layer's output
(dropping, fusing or merging tokens), with what it needs measured in the layer and whether
attention to its tokens is proportional to their size; for decoders, ``select`` picks the
prompt tokens the later layers keep (dropping only, so the KV cache stays exact for what is
kept). ``random``, the control, has both."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..registry import Registry, describe
from .merge import merge_tokens
from .prompt import divprune_keep, fastv_keep, last_token_attention, random_prompt_keep
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
class PromptTokens:
    """A decoder's prompt as a selector sees it. ``x``: ``(B, N, d)`` the hidden states entering
    the first pruned layer; ``k``: tokens to keep, ``1 <= k <= N``; ``last_attn``: ``(B, N)``
    attention the last prompt token paid each token in the last unpruned layer (when needed);
    ``generator``: for random selectors, seeded once per prompt."""

    x: Tensor
    k: int
    last_attn: Tensor | None = None
    generator: torch.Generator | None = None


@dataclass(frozen=True)
class TokenMethod:
    """Encoders: ``fn(LayerTokens) -> (x (B, N - n_remove, d), sizes (B, N - n_remove))``,
    [CLS] first; ``needs``: what the layer must measure (``cls_attn``, ``keys``, ``generator``);
    ``proportional``: later layers add ``log(size)`` to the attention logits of its tokens.
    Decoders: ``select(PromptTokens) -> (B, k)`` sorted indices of the prompt tokens kept, the
    last one among them; ``prompt_needs``: ``last_attn`` and/or ``generator``. A method lacking
    one of the two functions does not apply to that kind of model."""

    fn: Callable[[LayerTokens], tuple[Tensor, Tensor]] | None = None
    needs: frozenset[str] = frozenset()
    proportional: bool = False
    select: Callable[[PromptTokens], Tensor] | None = None
    prompt_needs: frozenset[str] = frozenset()

    @property
    def kinds(self) -> tuple[str, ...]:
        """``encoder`` and/or ``decoder``: the models this method applies to."""
        return tuple(k for k, f in (("encoder", self.fn), ("decoder", self.select)) if f is not None)


TOKEN_METHODS: Registry[TokenMethod] = Registry("token method", "token_methods")


def register_token_method(name: str, *, needs: tuple[str, ...] = (), proportional: bool = False,
                          paper: str = "", select: Callable[[PromptTokens], Tensor] | None = None,
                          prompt_needs: tuple[str, ...] = ()) -> Callable[[Callable | None], Callable | None]:
    """Register ``fn`` (an encoder reduction, or None for a decoder-only method) and ``select``
    (a decoder prompt selector) as token method ``name`` (see :class:`TokenMethod`)."""
    def add(fn: Callable[[LayerTokens], tuple[Tensor, Tensor]] | None) -> Callable | None:
        method = TokenMethod(fn, frozenset(needs), proportional, select, frozenset(prompt_needs))
        about = None if fn is not None else describe(select)  # the catalogue reads fn's docstring otherwise
        TOKEN_METHODS.register(name, paper=paper, description=about)(method)
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


def random_prompt(t: PromptTokens) -> Tensor:
    """Keep random prompt tokens, the last one kept (the control)."""
    return random_prompt_keep(t.x.shape[0], t.x.shape[1], t.k, t.generator, t.x.device)


@register_token_method("random", needs=("generator",), select=random_prompt, prompt_needs=("generator",))
def random_drop(t: LayerTokens) -> tuple[Tensor, Tensor]:
    """Drop random tokens, [CLS] kept (the control)."""
    idx = random_keep(t.sizes, t.x.shape[1] - 1 - t.n_remove, t.generator)  # (B, N - n_remove)
    return gather_tokens(t.x, idx), t.sizes.gather(1, idx)


def fastv(t: PromptTokens) -> Tensor:
    """Keep the prompt tokens the last one attends to (decoders)."""
    return fastv_keep(t.last_attn, t.k)


def divprune(t: PromptTokens) -> Tensor:
    """Keep a max-min diverse subset of prompt tokens (decoders)."""
    return divprune_keep(t.x, t.k)


register_token_method("fastv", select=fastv, prompt_needs=("last_attn",),
                      paper="Chen et al. 2024, An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference "
                      "Acceleration for Large Vision-Language Models (FastV)")(None)
register_token_method("divprune", select=divprune, paper="Alvar et al. 2025, DivPrune: Diversity-based Visual Token "
                      "Pruning for Large Multimodal Models (DivPrune)")(None)


__all__ = ["LayerTokens", "PromptTokens", "TokenMethod", "TOKEN_METHODS", "register_token_method"]

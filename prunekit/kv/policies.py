"""KV-cache policies: which cached positions a layer keeps, as pure tensor functions, and the
small policy classes of :data:`KV_POLICIES` that apply them to a :class:`~prunekit.kv.cache.KVLayer`.

Shapes: ``B`` batch, ``Hq`` query heads, ``H`` key/value heads (``Hq = G * H`` under grouped-query
attention; query head ``h`` reads key/value head ``h // G``, as ``repeat_kv`` lays them out), ``q``
queries of one forward, ``n`` cached positions, ``D`` head dimension.

Every policy sees the same life cycle: a forward attends to the cache as it stood plus its own new
tokens; then the policy decides what the layer stores. Token policies keep positions in the order
they arrived (indices are sorted), so the most recent tokens are always the last entries.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..registry import Registry
from ..rounding import count

if TYPE_CHECKING:
    from .cache import KVLayer

# ---------------------------------------------------------------------------------------------
# budgets


def check_budget(budget: int | float | None) -> None:
    """Refuse a budget that is neither a token count >= 1 nor a fraction in (0, 1]."""
    if budget is None:
        return
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ConfigError(f"budget={budget!r}: give a token count (budget=256) or a fraction of the prompt "
                          "(budget=0.25)")
    if isinstance(budget, float):
        if not (0.0 < budget <= 1.0) or math.isnan(budget):
            raise ConfigError(f"budget={budget!r}: a fraction of the prompt must lie in (0, 1]; for a token "
                              "count give an int (budget=256)")
    elif budget < 1:
        raise ConfigError(f"budget={budget!r}: a token budget must be >= 1 (or a fraction in (0, 1])")


def budget_tokens(budget: int | float, prompt: int) -> int:
    """Tokens a layer may keep: an int as given; a fraction of the ``prompt``'s tokens, rounded
    half up by :func:`prunekit.rounding.count`, at least 1."""
    if isinstance(budget, float):
        return max(count(budget, prompt), 1)
    return int(budget)


def check_floor(tokens: int, floor: int, what: str, budget: int | float) -> None:
    """Refuse a budget of ``tokens`` below the ``floor`` (``what`` spells it out: ``sink + window = 4 + 32 = 36``)."""
    if tokens < floor:
        given = f"budget={budget!r} ({tokens} tokens)" if isinstance(budget, float) else f"budget={tokens}"
        raise ConfigError(f"{given} is below {what}: raise the budget to at least {floor} or lower "
                          "the window/sink")


# ---------------------------------------------------------------------------------------------
# pure selection functions


def group_query_heads(attn: Tensor, kv_heads: int) -> Tensor:
    """Attention summed over the query heads that share one key/value head (GQA):
    ``(B, Hq, q, n) -> (B, H, q, n)``."""
    b, hq, q, n = attn.shape
    if hq % kv_heads:
        raise ValueError(f"{hq} query heads do not group evenly onto {kv_heads} key/value heads")
    return attn.float().view(b, kv_heads, hq // kv_heads, q, n).sum(dim=2)


def top_sorted(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` highest ``scores`` along the last dim, in ascending index order; ties
    go to the earlier position (a stable sort), so the choice is deterministic:
    ``(..., m) -> (..., k)``."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # (..., m)
    return order[..., :k].sort(dim=-1).values


def streaming_keep(n: int, sink: int, budget: int, device: torch.device | None = None) -> Tensor:
    """StreamingLLM (Xiao et al. 2023): the first ``sink`` positions (attention sinks) and the
    most recent ``budget - sink``, out of ``n``: ``(min(n, budget),)``."""
    if n <= budget:
        return torch.arange(n, device=device)
    recent = budget - sink
    return torch.cat([torch.arange(sink, device=device), torch.arange(n - recent, n, device=device)])


def h2o_keep(scores: Tensor, budget: int, window: int) -> Tensor:
    """H2O (Zhang et al. 2023): the ``window`` most recent positions plus the ``budget - window``
    heavy hitters, the earlier positions with the largest accumulated attention ``scores``:
    ``(B, H, n) -> (B, H, min(n, budget))`` sorted indices, chosen per key/value head."""
    b, h, n = scores.shape
    if n <= budget:
        return torch.arange(n, device=scores.device).expand(b, h, n)
    recent = torch.arange(n - window, n, device=scores.device).expand(b, h, window)
    heavy = top_sorted(scores[..., : n - window], budget - window)  # (B, H, budget - window)
    return torch.cat([heavy, recent], dim=-1)


def snapkv_votes(attn: Tensor, kv_heads: int, observation: int, kernel: int, pooling: str = "avg") -> Tensor:
    """SnapKV (Li et al. 2024): the last ``observation`` queries of the prompt vote for the earlier
    positions by the attention they pay them, summed over the window and over the query heads
    of a group, then pooled along positions (``kernel``, stride 1, same length) so a chosen
    position brings its neighbours (``pooling``: ``avg``, zero padding counted, or ``max``):
    ``(B, Hq, q, n) -> (B, H, n - observation)``."""
    b, _, _, n = attn.shape
    window = attn[:, :, -observation:, : n - observation]  # (B, Hq, w, n - w)
    votes = group_query_heads(window, kv_heads).sum(dim=2)  # (B, H, n - w)
    if kernel == 1:
        return votes
    flat = votes.reshape(b * kv_heads, 1, n - observation)
    pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
    return pool(flat, kernel, stride=1, padding=kernel // 2).view(b, kv_heads, n - observation)


def snapkv_keep(votes: Tensor, budget: int, observation: int) -> Tensor:
    """The ``budget - observation`` most voted prompt positions plus the observation window itself:
    ``(B, H, n - observation) -> (B, H, budget)`` sorted indices into the ``n`` prompt positions."""
    b, h, m = votes.shape
    window = torch.arange(m, m + observation, device=votes.device).expand(b, h, observation)
    return torch.cat([top_sorted(votes, budget - observation), window], dim=-1)


def magnitude_prune(x: Tensor, sparsity: float) -> Tensor:
    """Mustafar-style per-token magnitude pruning (Joshi et al. 2025): in every vector along the
    last dim, zero the ``count(sparsity, D)`` entries of smallest magnitude (unstructured within
    the vector; ties go to the earlier entry): ``(..., D) -> (..., D)``, a new tensor."""
    k = count(sparsity, x.shape[-1])
    if k == 0 or x.numel() == 0:
        return x
    smallest = torch.sort(x.abs(), dim=-1, stable=True).indices[..., :k]  # (..., k)
    return x.scatter(-1, smallest, torch.zeros((), dtype=x.dtype, device=x.device).expand(smallest.shape))


# ---------------------------------------------------------------------------------------------
# parameters and policies


def _check_ints(owner: str, **values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{owner}: {name} must be an int >= 0, got {value!r}")


@dataclass(frozen=True)
class StreamingParams:
    """``sink``: first tokens always kept (attention sinks); ``window``: the fewest recent tokens
    kept (every budget token after the sinks is a recent one; no budget means sink + window)."""

    sink: int = 4
    window: int = 0

    def __post_init__(self) -> None:
        _check_ints("streaming", sink=self.sink, window=self.window)


@dataclass(frozen=True)
class H2OParams:
    """``window``: most recent tokens always kept; the rest of the budget holds heavy hitters."""

    window: int = 32

    def __post_init__(self) -> None:
        _check_ints("h2o", window=self.window)


@dataclass(frozen=True)
class SnapKVParams:
    """``observation``: last prompt queries that vote (kept themselves); ``kernel``: odd width of
    the average pooling along positions (1: none), as SnapKV's default ``avgpool``."""

    observation: int = 32
    kernel: int = 5

    def __post_init__(self) -> None:
        _check_ints("snapkv", observation=self.observation, kernel=self.kernel)
        if self.observation < 1:
            raise ConfigError("snapkv: observation must be >= 1 (the queries that vote), got 0")
        if self.kernel % 2 == 0:
            raise ConfigError(f"snapkv: kernel must be odd (a centred pooling window), got {self.kernel}")


@dataclass(frozen=True)
class MagnitudeParams:
    """``sparsity``: fraction of each cached key/value vector zeroed; ``window``: most recent
    tokens kept dense."""

    sparsity: float = 0.5
    window: int = 0

    def __post_init__(self) -> None:
        _check_ints("magnitude", window=self.window)
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) \
                or not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"magnitude: sparsity must lie in [0, 1), got {self.sparsity!r}")


class Policy:
    """A KV-cache policy: its parameters, what it needs, and two moments to act on a layer."""

    name: ClassVar[str] = ""
    #: scores tokens by the attention probabilities (the model must run eager attention)
    needs_attention: ClassVar[bool] = False
    #: drops positions, so the cache holds fewer than the tokens seen
    evicts: ClassVar[bool] = True

    def __init__(self, params: object) -> None:
        self.params = params

    def floor(self) -> tuple[int, str]:
        """The smallest budget and what it is made of (for the error)."""
        return 0, "0"

    def default_budget(self) -> int | None:
        return None

    def after_update(self, layer: KVLayer) -> None:
        """Called after a forward's keys and values were appended, before attention."""

    def after_attention(self, layer: KVLayer, attn: Tensor, first: bool) -> None:
        """Called with the forward's attention probabilities ``(B, Hq, q, n)``; ``first``: the
        layer's first forward (the prompt)."""


KV_POLICIES: Registry[type[Policy]] = Registry("KV policy", "kv_policies")


@KV_POLICIES.register("streaming", params=StreamingParams,
                      paper="Xiao et al. 2023, Efficient Streaming Language Models with Attention Sinks "
                            "(StreamingLLM)")
class Streaming(Policy):
    """Attention sinks plus the most recent tokens (no scores)."""

    name = "streaming"

    def floor(self) -> tuple[int, str]:
        p = self.params
        return p.sink + p.window, f"sink + window = {p.sink} + {p.window} = {p.sink + p.window}"

    def default_budget(self) -> int | None:
        return self.floor()[0] or None

    def after_update(self, layer: KVLayer) -> None:
        keep = streaming_keep(layer.stored, self.params.sink, layer.budget, layer.keys.device)
        if keep.numel() < layer.stored:
            layer.keep(keep.expand(*layer.keys.shape[:2], -1))


@KV_POLICIES.register("h2o", params=H2OParams,
                      paper="Zhang et al. 2023, H2O: Heavy-Hitter Oracle for Efficient Generative Inference of "
                            "Large Language Models (H2O)")
class H2O(Policy):
    """Heavy hitters by accumulated attention plus a recent window."""

    name = "h2o"
    needs_attention = True

    def floor(self) -> tuple[int, str]:
        return self.params.window, f"window = {self.params.window}"

    def after_attention(self, layer: KVLayer, attn: Tensor, first: bool) -> None:
        # every query's attention row adds to what each cached position has received so far
        layer.scores = layer.scores + group_query_heads(attn, layer.kv_heads).sum(dim=2)  # (B, H, n)
        if layer.stored > layer.budget:
            layer.keep(h2o_keep(layer.scores, layer.budget, self.params.window))


@KV_POLICIES.register("snapkv", params=SnapKVParams,
                      paper="Li et al. 2024, SnapKV: LLM Knows What You are Looking for Before Generation "
                            "(SnapKV)")
class SnapKV(Policy):
    """The prompt's last queries vote which prompt positions stay."""

    name = "snapkv"
    needs_attention = True

    def floor(self) -> tuple[int, str]:
        return self.params.observation, f"observation = {self.params.observation}"

    def after_attention(self, layer: KVLayer, attn: Tensor, first: bool) -> None:
        # the budget bounds the prompt only: generated tokens are appended afterwards
        if not first or layer.stored <= layer.budget:
            return
        p = self.params
        votes = snapkv_votes(attn, layer.kv_heads, p.observation, p.kernel)  # (B, H, n - w)
        layer.keep(snapkv_keep(votes, layer.budget, p.observation))


@KV_POLICIES.register("magnitude", params=MagnitudeParams,
                      paper="Joshi et al. 2025, Mustafar: Promoting Unstructured Sparsity for KV Cache Pruning "
                            "in LLM Inference (Mustafar)")
class Magnitude(Policy):
    """Zero the smallest entries of every cached K/V vector."""

    name = "magnitude"
    evicts = False

    def after_update(self, layer: KVLayer) -> None:
        end = layer.stored - self.params.window  # entries before `end` have left the dense window
        if end > layer.pruned:
            layer.prune_range(layer.pruned, end, self.params.sparsity)


__all__ = ["KV_POLICIES", "Policy", "StreamingParams", "H2OParams", "SnapKVParams", "MagnitudeParams",
           "check_budget", "budget_tokens", "group_query_heads", "top_sorted", "streaming_keep", "h2o_keep",
           "snapkv_votes", "snapkv_keep", "magnitude_prune"]

"""The transformers ``Cache`` a KV policy runs in: ``model.generate(..., past_key_values=cache)``
works unchanged.

How eviction stays correct. RoPE is applied before keys are cached, so an evicted entry simply
disappears and the kept ones keep their rotation. Each layer counts the tokens it has *seen*:
``get_seq_length()`` returns that count, so the positions the model and ``generate`` derive from it
keep counting real token indices. The mask is sized by ``get_mask_sizes(q) = (stored + q, seen -
stored)``: the stored entries are given the indices just before the new tokens. Every stored entry
is in the past of every query, so causality holds for them; the new tokens keep their exact causal
pattern among themselves. The cost: a 2-D padding mask would be read at those recent indices, so an
evicting cache refuses padded batches instead of mixing padding into what it keeps. The mask is
built once per forward from the first layer, so every layer keeps the same number of entries (one
budget for all layers). Each entry's real position is stored beside it (``positions``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from ..errors import ConfigError
from .policies import Policy, budget_tokens, check_floor, magnitude_prune

_ROLLBACK = ("a KV policy cache cannot be rolled back (evicted entries are gone), so assisted or speculative "
             "decoding cannot use it; generate without assistant_model / prompt_lookup_num_tokens")


@dataclass
class _Ledger:
    """Bytes of keys and values held by all layers now, and the most held at once."""

    held: int = 0
    peak: int = 0

    def change(self, delta: int) -> None:
        self.held += delta
        self.peak = max(self.peak, self.held)


class KVLayer(DynamicLayer):
    """One layer's cache under a policy: keys and values ``(B, H, n, D)``, each entry's real
    position ``(B, H, n)``, and its accumulated attention ``(B, H, n)`` when the policy scores."""

    is_croppable = False

    def __init__(self, policy: Policy, budget: int | float | None, ledger: _Ledger) -> None:
        super().__init__()
        self.policy, self.requested, self.ledger = policy, budget, ledger
        self._clear()

    def _clear(self) -> None:
        self.budget: int | None = None if isinstance(self.requested, float) else self.requested
        self.seen = 0  # tokens this layer has been given, evicted or not
        self.forwards = 0
        self.attended = 0  # forwards whose attention probabilities reached the policy
        self.pruned = 0  # magnitude: entries [0, pruned) are sparsified
        self.positions: Tensor | None = None
        self.scores: Tensor | None = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        b, h, _, d = key_states.shape
        self.device = key_states.device
        self.keys = key_states.new_zeros(b, h, 0, d)
        self.values = value_states.new_zeros(b, h, 0, value_states.shape[-1])
        self.positions = torch.zeros(b, h, 0, dtype=torch.long, device=self.device)
        self.scores = torch.zeros(b, h, 0, dtype=torch.float32, device=self.device)
        self.is_initialized = True

    @property
    def stored(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    @property
    def kv_heads(self) -> int:
        return self.keys.shape[1]

    def kv_bytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def _resolve(self, prompt: int) -> None:
        if self.budget is None and self.requested is not None:  # a fraction of the first forward's tokens
            self.budget = budget_tokens(self.requested, prompt)
            floor, what = self.policy.floor()
            check_floor(self.budget, floor, what, self.requested)

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Append ``(B, H, q, D)`` keys and values; the forward attends to all that is returned,
        then the policy decides what stays."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.policy.needs_attention and self.attended != self.forwards:
            raise ConfigError(f"KV policy {self.policy.name!r} got no attention probabilities for the last forward: "
                              "its hook is not on the model running it; use the cache only with the model "
                              "prunekit.kv.cache(model, ...) was given")
        b, h, q, _ = key_states.shape
        self._resolve(q)
        before = self.kv_bytes()
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        new = torch.arange(self.seen, self.seen + q, device=self.device).expand(b, h, q)
        self.positions = torch.cat([self.positions, new], dim=-1)
        if self.policy.needs_attention:  # other policies keep an empty (B, H, 0) score tensor
            self.scores = torch.cat([self.scores, self.scores.new_zeros(b, h, q)], dim=-1)
        self.seen += q
        self.forwards += 1
        self.ledger.change(self.kv_bytes() - before)
        keys, values = self.keys, self.values
        self.policy.after_update(self)
        return keys, values

    def attend(self, attn: Tensor) -> None:
        """Hand this forward's attention probabilities ``(B, Hq, q, n)`` to the policy."""
        self.attended += 1
        self.policy.after_attention(self, attn, first=self.forwards == 1)

    def keep(self, index: Tensor) -> None:
        """Keep the entries at sorted storage ``index`` ``(B, H, k)``, per batch row and head."""
        before = self.kv_bytes()
        wide = index.unsqueeze(-1).expand(*index.shape, self.keys.shape[-1])  # (B, H, k, D)
        self.keys = self.keys.gather(2, wide)
        self.values = self.values.gather(2, index.unsqueeze(-1).expand(*index.shape, self.values.shape[-1]))
        self.positions = self.positions.gather(2, index)
        if self.policy.needs_attention:
            self.scores = self.scores.gather(2, index)
        self.ledger.change(self.kv_bytes() - before)

    def prune_range(self, start: int, end: int, sparsity: float) -> None:
        """Sparsify the stored entries ``[start, end)`` (new tensors: this forward keeps its dense view)."""
        def cut(x: Tensor) -> Tensor:
            return torch.cat([x[..., :start, :], magnitude_prune(x[..., start:end, :], sparsity), x[..., end:, :]],
                             dim=-2)

        self.keys, self.values = cut(self.keys), cut(self.values)
        self.pruned = end

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int | Tensor) -> tuple[int, int]:
        if isinstance(query_length, Tensor):  # transformers 4.x passes the forward's cache_position
            query_length = query_length.shape[0]
        return self.stored + query_length, self.seen - self.stored

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise ConfigError(f"crop({tokens_to_remove}): {_ROLLBACK}")

    def _rows(self, pick: Any) -> None:
        if self.is_initialized:
            self.keys, self.values = pick(self.keys), pick(self.values)
            self.positions, self.scores = pick(self.positions), pick(self.scores)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rows(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rows(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._rows(lambda x: x[indices, ...])

    def reset(self) -> None:
        self.ledger.change(-self.kv_bytes())
        super().reset()
        self._clear()


@dataclass(frozen=True)
class KVReport:
    """What a policy cache holds. Bytes are of keys and values only: ``full_bytes`` is what a
    plain DynamicCache would hold for the tokens seen, ``kept_bytes`` what is stored (dense),
    ``peak_bytes`` the most held at once over the run (a prompt is stored whole before a scoring
    policy cuts it), ``overhead_bytes`` the policy's bookkeeping (positions, scores).
    ``sparse_bytes``: magnitude only, an *estimate* for a bitmap sparse format (each pruned vector:
    its nonzeros plus one bit per entry); stored densely, as here, pruning saves nothing."""

    policy: str
    budget: int | None
    tokens: int  # tokens seen per layer
    kept: list[int]  # entries stored per layer (per batch row and head)
    full_bytes: int
    kept_bytes: int
    peak_bytes: int
    overhead_bytes: int
    sparse_bytes: int | None = None
    zero_fraction: float | None = None

    @property
    def saved(self) -> float:
        """Fraction of the full cache's dense bytes not stored."""
        return 1.0 - self.kept_bytes / self.full_bytes if self.full_bytes else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "saved": self.saved}

    def __str__(self) -> str:
        mib = 2 ** 20
        line = (f"{self.policy}: {max(self.kept, default=0)} of {self.tokens} tokens kept per layer, "
                f"{self.kept_bytes / mib:.2f} of {self.full_bytes / mib:.2f} MiB dense ({self.saved:.0%} saved), "
                f"peak {self.peak_bytes / mib:.2f} MiB")
        if self.sparse_bytes is not None:
            line += (f"; {self.zero_fraction:.0%} zeros, ~{self.sparse_bytes / mib:.2f} MiB in a bitmap sparse "
                     "format (estimate; dense storage saves nothing)")
        return line


class KVCache(DynamicCache):
    """A DynamicCache whose layers follow one KV policy (:func:`prunekit.kv.cache` builds it and
    hooks it to its model). ``close()`` (or ``with``) removes the hooks."""

    def __init__(self, policy: Policy, budget: int | float | None, num_layers: int) -> None:
        self.policy, self.requested = policy, budget
        self.ledger = _Ledger()
        Cache.__init__(self, layers=[KVLayer(policy, budget, self.ledger) for _ in range(num_layers)])
        self._handles: list[Any] = []
        self._closed = False

    def after_attention(self, layer_idx: int, attn: Tensor) -> None:
        self.layers[layer_idx].attend(attn)

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[Tensor, Tensor]:
        if self._closed:
            raise ConfigError("this KV cache was closed (its hooks are gone); make a new one with prunekit.kv.cache")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def positions(self, layer_idx: int = 0) -> Tensor:
        """Real token index of every stored entry of a layer: ``(B, H, n)``."""
        return self.layers[layer_idx].positions

    def report(self) -> KVReport:
        layers = [la for la in self.layers if la.is_initialized]
        full = sum(la.seen * _token_bytes(la) for la in layers)
        overhead = sum(la.positions.nbytes + la.scores.nbytes for la in layers)
        sparse = zeros = None
        if not self.policy.evicts:
            sparse, zeros = _sparse_estimate(layers)
        return KVReport(self.policy.name, layers[0].budget if layers else None, layers[0].seen if layers else 0,
                        [la.stored for la in layers], full, sum(la.kv_bytes() for la in layers), self.ledger.peak,
                        overhead, sparse, zeros)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._closed = True

    def __enter__(self) -> KVCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _token_bytes(layer: KVLayer) -> int:
    """Dense bytes of one token's keys and values in a layer (all batch rows and heads)."""
    k, v = layer.keys, layer.values
    return k.shape[0] * k.shape[1] * (k.shape[-1] * k.element_size() + v.shape[-1] * v.element_size())


def _sparse_estimate(layers: list[KVLayer]) -> tuple[int, float]:
    """Bytes of a bitmap sparse format (nonzeros + one bit per entry of each pruned vector, the
    dense window as is) and the fraction of zero entries, over keys and values of ``layers``."""
    total = zeros = entries = 0
    for la in layers:
        for x in (la.keys, la.values):
            d, size = x.shape[-1], x.element_size()
            pruned, dense = x[..., : la.pruned, :], x[..., la.pruned:, :]
            nonzero = int(torch.count_nonzero(pruned))
            total += nonzero * size + math.ceil(d / 8) * (pruned.numel() // d) + dense.nbytes
            zeros += x.numel() - int(torch.count_nonzero(x))
            entries += x.numel()
    return total, zeros / entries if entries else 0.0


__all__ = ["KVCache", "KVLayer", "KVReport"]

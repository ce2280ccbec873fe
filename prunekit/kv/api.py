"""``prunekit.kv.cache``: a KV policy's cache for one model, checked and hooked."""
from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from ..errors import ConfigError
from .attention import attach, check_decoder, check_eager
from .kvcache import KVCache
from .policies import KV_POLICIES, check_budget, check_floor


def cache(model: nn.Module, policy: str, budget: int | float | None = None, **params: Any) -> KVCache:
    """A cache that prunes ``model``'s KV cache with ``policy`` (``streaming``, ``h2o``,
    ``snapkv``, ``magnitude``) while it generates: pass it as
    ``model.generate(..., past_key_values=cache)`` (or to a forward) and read ``cache.report()``.

    ``budget``: entries kept per layer and key/value head, as tokens (``256``) or as a fraction
    of the prompt, the first forward's tokens (``0.25``); for ``snapkv`` it bounds the prompt and
    generated tokens are appended; ``magnitude`` keeps every token and takes none. ``params``: the
    policy's own (``sink``, ``window``, ``observation``, ``kernel``, ``sparsity``; see
    ``prunekit.list("kv_policies")``). ``h2o`` and ``snapkv`` read attention probabilities, so the
    model must run ``attn_implementation="eager"``. The cache hooks the model until
    ``cache.close()`` (or the end of a ``with`` block); use one cache per generation."""
    cls = KV_POLICIES.get(policy)
    settings = KV_POLICIES.params_of(policy)
    known = [f.name for f in dataclasses.fields(settings)] if settings else []
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ConfigError(f"KV policy {policy!r} has no parameter {', '.join(unknown)}; it takes: "
                          f"{', '.join(known) or 'none'}")
    chosen = cls(settings(**params) if settings else None)
    check_budget(budget)
    if not chosen.evicts:
        if budget is not None:
            raise ConfigError(f"KV policy {policy!r} keeps every token (it zeroes entries within each vector), so "
                              f"budget={budget!r} has no meaning; set sparsity= (and window= for dense recent tokens)")
    else:
        budget = chosen.default_budget() if budget is None else budget
        if budget is None:
            raise ConfigError(f"KV policy {policy!r} needs a budget: budget=256 (tokens per layer and head) or "
                              "budget=0.25 (a fraction of the prompt)")
        if isinstance(budget, int):
            check_floor(budget, *chosen.floor(), budget)
    config = check_decoder(model)
    if chosen.needs_attention:
        check_eager(model, f"policy {policy!r}")
    kv = KVCache(chosen, budget, config.num_hidden_layers)
    kv._handles = attach(kv, model)
    return kv


__all__ = ["cache"]

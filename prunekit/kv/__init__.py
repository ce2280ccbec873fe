"""KV-cache policies at generation time: StreamingLLM, H2O, SnapKV and per-token magnitude
pruning (Mustafar), as a transformers ``Cache`` that ``model.generate(..., past_key_values=cache)``
uses unchanged.

>>> kv = prunekit.kv.cache(model, "h2o", budget=256, window=32)  # model loaded with attn "eager"
>>> out = model.generate(ids, max_new_tokens=64, past_key_values=kv)
>>> print(kv.report())

``policies`` holds the pure selection functions and :data:`KV_POLICIES`; ``kvcache`` the Cache
and its layers; ``attention`` the checks and hooks. Names load lazily."""
from __future__ import annotations

from ..lazy import lazy_getattr

_NAMES = {
    "cache": "api",
    "KVCache": "kvcache", "KVLayer": "kvcache", "KVReport": "kvcache",
    "NeedsEagerAttention": "attention",
    "KV_POLICIES": "policies", "Policy": "policies", "StreamingParams": "policies", "H2OParams": "policies",
    "SnapKVParams": "policies", "MagnitudeParams": "policies",
}
__all__ = sorted(_NAMES)
__getattr__ = lazy_getattr(__name__, _NAMES)


def __dir__() -> list[str]:
    return sorted({*globals(), *_NAMES})

"""Delta pruning and merging of fine-tuned models, streamed tensor by tensor.

- :func:`prune_delta`: DARE, DAREx-q, drop-only, magnitude and TIES trimming of one
  fine-tune's difference from its base; writes base + pruned delta as a Hugging Face
  directory, or only the sparse delta (``compact=True``).
- :func:`apply_delta`: a compact delta back onto its (checksummed) base, bit for bit.
- :func:`merge`: task arithmetic, TIES and DARE-TIES over several fine-tunes of one base.
- :func:`choose_q`: DAREx-q's rescaling chosen on data, by any evaluation callback.

The methods are registries (``prunekit list delta_methods``, ``prunekit list merge_methods``).
"""
from __future__ import annotations

from ..lazy import lazy_getattr

_LAZY = {
    "prune_delta": "stream", "merge": "stream", "DeltaConfig": "stream", "MergeConfig": "stream",
    "Selection": "stream", "DeltaResult": "stream", "apply_delta": "compact", "read_compact": "compact",
    "choose_q": "search", "open_checkpoint": "checkpoint", "DELTA_METHODS": "ops", "MERGE_METHODS": "ops",
}
__all__ = sorted(_LAZY)
__getattr__ = lazy_getattr(__name__, _LAZY)

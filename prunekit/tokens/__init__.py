"""Token pruning and merging at inference: fewer tokens through the later layers of a
BERT-style encoder or a ViT, or of a causal LM's prompt, applied by hooks and taken away again.

    with prunekit.tokens.prune(model, "tome", r=8) as handle:
        out = model(**batch)
    handle = prunekit.tokens.apply(model, "evit", keep=0.7, layers=[3, 6, 9])
    handle.report(batch)  # tokens and MACs per layer, latency against the unpruned run
    handle.remove()

Methods (:data:`TOKEN_METHODS`): ``evit`` (Liang et al. 2022, keep what [CLS] attends to, fuse
the rest), ``tome`` (Bolya et al. 2023, bipartite merging with proportional attention),
``random`` (the control); for a causal LM's prompt (:class:`PromptHandle`) ``fastv`` (Chen et
al. 2024, what the last token attends to after layer K), ``divprune`` (Alvar et al. 2025, a
max-min diverse subset) and ``random``, after which ``model.generate`` continues unchanged:

    with prunekit.tokens.prune(model, "fastv", keep=0.5, after=2):
        out = model.generate(**batch, max_new_tokens=20)

Amounts and layers: :class:`TokenStage`. The pure tensor functions
(:mod:`.select`, :mod:`.merge`) can be checked by hand.
"""
from __future__ import annotations

from .config import TokenStage, removed
from .decoder import PromptHandle
from .handle import Handle, applied, remove
from .hooks import TokenHandle, apply, is_causal_lm, prune
from .layout import SUPPORTED, layout_for
from .merge import attention_bias, bipartite_merge, match_scores, max_merge, merge_tokens
from .methods import TOKEN_METHODS, LayerTokens, PromptTokens, TokenMethod, register_token_method
from .prompt import cosine_distance, divprune_keep, fastv_keep, last_token_attention, random_prompt_keep
from .report import TokenReport
from .select import cls_attention, evit_fuse, evit_keep, gather_tokens, random_keep, weighted_mean

__all__ = ["TOKEN_METHODS", "SUPPORTED", "Handle", "LayerTokens", "applied", "remove", "PromptHandle", "PromptTokens", "TokenHandle", "TokenMethod",
           "TokenReport", "TokenStage", "apply", "cosine_distance", "divprune_keep", "fastv_keep", "is_causal_lm",
           "last_token_attention", "random_prompt_keep", "attention_bias", "bipartite_merge", "cls_attention", "evit_fuse", "evit_keep", "gather_tokens",
           "layout_for", "match_scores", "max_merge", "merge_tokens", "prune", "random_keep", "register_token_method",
           "removed", "weighted_mean"]

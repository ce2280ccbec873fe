"""Where token pruning reaches into a model: its blocks, each block's attention call (to give
it the mask of the tokens left) and query/key projections (to measure [CLS] attention and
keys), and the widths the cost model needs. Two families: Hugging Face BERT-style encoders
(``encoder.layer[i].attention.self`` with ``query``/``key``: BERT, MiniLM, RoBERTa, ...) and
prunekit's zoo :class:`~prunekit.models.zoo.ViT`. Anything else is refused by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModelError

SUPPORTED = ("Hugging Face BERT-style encoders (encoder.layer[i].attention.self.query/key: BERT, MiniLM, RoBERTa) "
             "and prunekit's zoo ViT")


@dataclass(frozen=True)
class Block:
    """One block: ``module`` (its output is where tokens go), ``attention`` (the module whose
    call takes the attention mask), its ``query`` and ``key`` Linears, ``head_dim``, the logit
    ``scale``, and the widths: ``hidden`` (d), ``attn_width`` (heads x head_dim), ``mlp_width``."""

    module: nn.Module
    attention: nn.Module
    query: nn.Linear
    key: nn.Linear
    head_dim: int
    scale: float
    hidden: int
    attn_width: int
    mlp_width: int

    def macs(self, n: int) -> int:
        """Multiply-accumulates of the block on ``n`` tokens (one sequence): the q, k, v and
        output projections, the two attention matmuls (``QK^T``, ``AV``) and the MLP."""
        d, a, f = self.hidden, self.attn_width, self.mlp_width
        return 3 * n * d * a + n * a * d + 2 * n * n * a + 2 * n * d * f


@dataclass(frozen=True)
class TokenLayout:
    """A model's ``blocks`` and how its attention modules are called: ``hidden_arg`` and
    ``mask_arg`` are ``(keyword, position)`` of the hidden states and of the additive attention
    mask (``(B, 1, 1, N)``, added to the logits) in that call."""

    family: str
    blocks: tuple[Block, ...]
    hidden_arg: tuple[str, int]
    mask_arg: tuple[str, int]

    def read(self, which: tuple[str, int], args: tuple, kwargs: dict) -> Any:
        name, pos = which
        return args[pos] if len(args) > pos else kwargs.get(name)

    def write(self, which: tuple[str, int], args: tuple, kwargs: dict, value: Any) -> tuple[tuple, dict]:
        name, pos = which
        if len(args) > pos:
            return args[:pos] + (value,) + args[pos + 1:], kwargs
        return args, {**kwargs, name: value}


def valid_tokens(mask: Tensor | None, b: int, n: int, device: torch.device) -> Tensor:
    """``(B, N)`` True for the tokens a model's own attention mask lets [CLS] see: the padding
    mask, read from a ``(B, N)`` 0/1 mask, or the first query's row of a ``(B, 1, Nq, N)`` mask
    (boolean, True = attend; or additive, 0 = attend, very negative = masked); all True for None."""
    if mask is None:
        return torch.ones(b, n, dtype=torch.bool, device=device)
    row = mask.bool() if mask.dim() == 2 else mask[:, 0, 0, :]  # (B or 1, N)
    if row.dtype != torch.bool:
        row = row > torch.finfo(row.dtype).min / 2
    return row.expand(b, n)


def _refuse_decoders(model: nn.Module, method: str) -> None:
    config = getattr(model, "config", None)
    kind = type(model).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{kind} is an encoder-decoder model; token method {method!r} runs on encoders "
                                    f"with a [CLS] token: {SUPPORTED}")
    causal = "config.is_decoder" if getattr(config, "is_decoder", False) else next(
        (name for name, m in model.named_modules() if getattr(m, "is_causal", False) is True), None)
    if causal is not None:
        raise UnsupportedModelError(
            f"{kind} is a decoder (causal attention: {causal}); token method {method!r} drops and merges tokens of "
            f"bidirectional encoders, reading the [CLS] token at position 0: {SUPPORTED}. For a causal LM's prompt "
            "use fastv, divprune or random on the model AutoModelForCausalLM loads, or prune its KV cache (prunekit.kv)")


def _hf_bert(model: nn.Module, layers: nn.ModuleList, method: str) -> TokenLayout:
    impl = getattr(getattr(model, "config", None), "_attn_implementation", "eager")
    if impl not in ("eager", "sdpa"):
        raise UnsupportedModelError(
            f"{type(model).__name__} runs attention with {impl!r}, which takes no additive (B, 1, 1, N) mask; token "
            f"method {method!r} needs one to hide padding and weight merged tokens: load the model with "
            "attn_implementation='sdpa' (or 'eager')")
    blocks = []
    for layer in layers:
        attn = layer.attention.self
        head_dim = attn.attention_head_size
        blocks.append(Block(layer, attn, attn.query, attn.key, head_dim, getattr(attn, "scaling", head_dim ** -0.5),
                            attn.query.in_features, attn.query.out_features, layer.intermediate.dense.out_features))
    return TokenLayout("hf-bert", tuple(blocks), ("hidden_states", 0), ("attention_mask", 1))


def _zoo_vit(model: nn.Module) -> TokenLayout:
    blocks = []
    for blk in model.blocks:
        attn = blk.attn
        blocks.append(Block(blk, attn, attn.q, attn.k, attn.head_dim, attn.head_dim ** -0.5, attn.q.in_features,
                            attn.q.out_features, blk.mlp.fc1.out_features))
    return TokenLayout("zoo-vit", tuple(blocks), ("x", 0), ("mask", 1))


def _is_hf_bert(layers: Any) -> bool:
    return isinstance(layers, nn.ModuleList) and len(layers) > 0 and all(
        isinstance(getattr(getattr(getattr(layer, "attention", None), "self", None), "query", None), nn.Linear)
        and hasattr(getattr(layer, "intermediate", None), "dense") for layer in layers)


def layout_for(model: nn.Module, method: str) -> TokenLayout:
    """The :class:`TokenLayout` of ``model``; :class:`~prunekit.errors.UnsupportedModelError`
    naming the supported families for decoders, encoder-decoders and unknown models."""
    from ..models.zoo import ViT

    _refuse_decoders(model, method)
    if isinstance(model, ViT):
        return _zoo_vit(model)
    base = getattr(model, "base_model", model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if _is_hf_bert(layers):
        return _hf_bert(model, layers, method)
    raise UnsupportedModelError(f"token method {method!r} does not know where the blocks and attention of "
                                f"{type(model).__name__} are; it supports {SUPPORTED}")


__all__ = ["Block", "SUPPORTED", "TokenLayout", "layout_for", "valid_tokens"]

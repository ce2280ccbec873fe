"""Token pruning and merging applied to a model at inference through forward hooks, its source
untouched: :func:`apply` returns a :class:`TokenHandle` (``.remove()`` takes every hook away),
:func:`prune` does the same for the length of a ``with`` block.

Per block three hooks: before the attention module runs, it gets the additive mask of the
tokens left (padding and, for proportional methods, ``log(size)``); forward hooks on the query
and key projections keep what the layer computed, from which the [CLS] attention and the
head-averaged keys are derived (so SDPA, which hides its probabilities, needs no special
case); after the block, the method removes tokens from its output.

Design decision and its cost: tokens go *after* a block, not between its attention and its
MLP as in EViT and ToMe. Blocks add their residuals inside their own ``forward`` (pre-norm ViT
blocks do both adds there), so removing tokens mid-block would mean rewriting each family's
block; after the block, a hook suffices for every family. The cost: the MLP of a reducing
layer still runs on its input tokens, which the MAC count reports as it is.

Until the first reduction the model's own mask reaches every layer untouched, so a method at
keep rate 1.0 or ``r = 0`` reproduces the unpruned outputs bit for bit.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from ..errors import ConfigError, UnsupportedModelError
from .config import TokenStage, removed
from .decoder import PromptHandle
from .handle import Handle
from .layout import TokenLayout, layout_for, valid_tokens
from .merge import attention_bias
from .methods import TOKEN_METHODS, LayerTokens
from .report import TokenReport, token_report
from .select import cls_attention


@dataclass
class _Run:
    """The state of one forward: sizes of the current tokens ``(B, N)``, whether the token set
    has changed yet, what the current layer's projections computed, and the tokens per layer."""

    sizes: Tensor
    generator: torch.Generator | None
    changed: bool = False
    query: Tensor | None = None
    key: Tensor | None = None
    tokens_in: list[int] = field(default_factory=list)
    tokens_out: list[int] = field(default_factory=list)


class TokenHandle(Handle):
    """Token pruning applied to ``model`` by hooks. ``enabled``: switch it off and on between
    forwards (:meth:`disabled` for a block); ``sizes``: ``(B, N_out)`` how many input tokens each
    output token of the last forward stands for (0 for padding), for pooling with
    :func:`~prunekit.tokens.weighted_mean`; :meth:`report`: tokens, MACs, latency;
    :meth:`remove`: the model as it was."""

    def __init__(self, model: nn.Module, stage: TokenStage, layout: TokenLayout) -> None:
        self.model, self.stage, self.layout = model, stage, layout
        self.method = TOKEN_METHODS.get(stage.method)
        self.plan = stage.plan(len(layout.blocks))
        self.enabled = True
        self.sizes: Tensor | None = None
        self._run: _Run | None = None
        self._last: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        self._hooks: list[Any] = []
        self._install()
        self._claim()

    # ---------------------------------------------------------------------------- hooks

    def _install(self) -> None:
        needs = self.method.needs
        for i, block in enumerate(self.layout.blocks):
            self._hooks.append(block.attention.register_forward_pre_hook(
                lambda m, a, kw, i=i: self._before_attention(i, a, kw), with_kwargs=True))
            if self.plan[i] is not None and "cls_attn" in needs:
                self._hooks.append(block.query.register_forward_hook(lambda m, a, out: self._keep("query", out)))
            if self.plan[i] is not None and needs & {"cls_attn", "keys"}:
                self._hooks.append(block.key.register_forward_hook(lambda m, a, out: self._keep("key", out)))
            self._hooks.append(block.module.register_forward_hook(lambda m, a, out, i=i: self._after_block(i, out)))

    def _start(self, args: tuple, kwargs: dict) -> _Run:
        x = self.layout.read(self.layout.hidden_arg, args, kwargs)  # (B, N, d)
        b, n = x.shape[0], x.shape[1]
        mask = self.layout.read(self.layout.mask_arg, args, kwargs)
        generator = None
        if "generator" in self.method.needs:
            generator = torch.Generator(device=x.device).manual_seed(self.stage.seed)
        return _Run(valid_tokens(mask, b, n, x.device).float(), generator)

    def _before_attention(self, i: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not self.enabled:
            return None
        if i == 0:
            self._run = self._start(args, kwargs)
        run = self._run
        x = self.layout.read(self.layout.hidden_arg, args, kwargs)  # (B, N, d)
        if run is None or x.shape[1] != run.sizes.shape[1]:
            raise UnsupportedModelError(f"block {i} of {type(self.model).__name__} ran out of order (or block 0 did "
                                        "not run first); token pruning follows the blocks one by one, in order")
        run.tokens_in.append(x.shape[1])
        if not run.changed:  # the model's own mask still fits: the unpruned computation, bit for bit
            return None
        bias = attention_bias(run.sizes, self.method.proportional, x.dtype)[:, None, None, :]  # (B, 1, 1, N)
        return self.layout.write(self.layout.mask_arg, args, kwargs, bias)

    def _keep(self, name: str, out: Tensor) -> None:
        if self.enabled and self._run is not None:
            setattr(self._run, name, out)  # (B, N, heads * head_dim)

    def _measured(self, i: int, x: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """The [CLS] attention ``(B, N)`` and head-averaged keys ``(B, N, hd)`` of block ``i``."""
        run, block, needs = self._run, self.layout.blocks[i], self.method.needs
        b, n = x.shape[0], x.shape[1]
        k = None if run.key is None else run.key.view(b, n, -1, block.head_dim)  # (B, N, H, hd)
        cls_attn = keys = None
        if "cls_attn" in needs:
            q = run.query.view(b, n, -1, block.head_dim)  # (B, N, H, hd)
            bias = attention_bias(run.sizes, self.method.proportional, torch.float32)  # what this layer added
            cls_attn = cls_attention(q, k, bias, block.scale)
        if "keys" in needs and k is not None:
            keys = k.mean(2)
        return cls_attn, keys

    def _after_block(self, i: int, out: Any) -> Any:
        if not self.enabled or self._run is None:
            return None
        run = self._run
        x = out[0] if isinstance(out, tuple) else out  # (B, N, d)
        n_remove = removed(self.plan[i], x.shape[1])
        if n_remove:
            cls_attn, keys = self._measured(i, x)
            x, run.sizes = self.method.fn(LayerTokens(x, run.sizes, n_remove, cls_attn, keys, run.generator))
            run.changed = True
        run.query = run.key = None
        run.tokens_out.append(x.shape[1])
        if i == len(self.layout.blocks) - 1:
            self.sizes, self._last, self._run = run.sizes, (tuple(run.tokens_in), tuple(run.tokens_out)), None
        if not n_remove:
            return None
        return (x, *out[1:]) if isinstance(out, tuple) else x

    # ------------------------------------------------------------------------ public

    def _reset(self) -> None:
        self._run = None

    def _report(self, latency: float | None, dense: float | None) -> TokenReport:
        return token_report(self.stage.method, self.layout.blocks, *self._last, latency, dense)


def apply(model: nn.Module, method: str | TokenStage, *, keep: float | None = None, r: int | None = None,
          layers: Any = None, schedule: Any = None, seed: int = 0, after: int | None = None) -> Handle:
    """Apply token method ``method`` (a :data:`TOKEN_METHODS` name, or a whole
    :class:`TokenStage`) to ``model`` until ``.remove()``; the arguments are the stage's.

    An encoder (BERT-style, the zoo ViT) gets a :class:`TokenHandle`; a causal LM gets a
    :class:`~prunekit.tokens.decoder.PromptHandle`, which cuts each prompt after ``after`` layers
    to ``keep`` of its tokens (``fastv``, ``divprune``, ``random``)."""
    if isinstance(method, TokenStage):
        if (keep, r, layers, schedule, seed, after) != (None, None, None, None, 0, None):
            raise ConfigError("apply(model, TokenStage(...)) takes its amounts from the stage; pass keep=, r=, "
                              "layers=, schedule=, seed= and after= to TokenStage instead")
        stage = method
    else:
        stage = TokenStage(method, keep, r, layers, schedule, seed, after)  # it normalises lists to tuples
    if is_causal_lm(model):
        return PromptHandle(model, stage)
    if stage.decoder:
        raise UnsupportedModelError(f"token method {stage.method!r} with after= cuts a causal LM's prompt, but "
                                    f"{type(model).__name__} is not a generative decoder; for encoders use evit, "
                                    "tome or random with keep=, r= or schedule=")
    return TokenHandle(model, stage, layout_for(model, stage.method))


def is_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face decoder-only model that generates (its config is not an encoder-decoder)."""
    config = getattr(model, "config", None)
    can_generate = getattr(model, "can_generate", None)
    return config is not None and not getattr(config, "is_encoder_decoder", False) and callable(can_generate) \
        and bool(can_generate())


@contextlib.contextmanager
def prune(model: nn.Module, method: str | TokenStage, **amounts: Any) -> Iterator[TokenHandle]:
    """:func:`apply` for the length of a ``with`` block: ``with prune(model, "tome", r=8) as h:``."""
    handle = apply(model, method, **amounts)
    try:
        yield handle
    finally:
        handle.remove()


__all__ = ["TokenHandle", "apply", "prune"]

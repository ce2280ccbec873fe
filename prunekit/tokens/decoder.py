"""Prompt-token pruning in a Hugging Face causal LM (FastV, DivPrune, random), by hooks: the
first ``after`` layers see every prompt token, the later ones only the ``keep`` fraction a
method picks, and ``model.generate`` continues from the pruned prefill unchanged.

How the cache and positions stay consistent. Tokens are dropped, never merged, at one cut:
a pre-hook on layer ``after`` gathers the hidden states, the rotary ``position_embeddings``,
``position_ids`` and the attention mask (rows and columns) at the kept indices, and the later
layers' pre-hooks gather the same inputs the model hands every layer. Each kept token keeps its
own position (RoPE is applied in the layer, from the gathered cos/sin), so the later layers'
caches hold exactly the keys and values they would have held for those tokens. The early
layers cache the whole prompt. Layer 0's cache therefore counts every prompt token, and the
positions the model and ``generate`` derive from it keep counting real token indices. On the
forwards that continue from a cut prompt, the later layers' mask is read at the kept prompt
columns followed by every column after the prompt, which is what their caches hold. Cut
before the first layer (``after=0``), layer 0's cache counts the dropped tokens itself
(:class:`_CutLayer`) and sizes the mask to what every layer holds.

What is refused by name: attention kernels other than eager and SDPA (the mask is gathered as a
tensor), sliding-window and hybrid layers (their caches drop tokens themselves), padded
batches (a cut would mix padding into what is kept), and FastV without eager attention (it
ranks by the attention probabilities the last prompt token pays in the last uncut layer).
"""
from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicLayer

from ..errors import ConfigError, UnsupportedModelError
from ..rounding import count
from .config import TokenStage
from .handle import Handle
from .methods import TOKEN_METHODS, PromptTokens
from .prompt import last_token_attention
from .report import TokenReport

DECODER_METHODS = "fastv, divprune or random"


@dataclass
class _Cut:
    """One prompt's cut: ``kept`` ``(B, k)`` sorted indices of its ``n`` tokens."""

    kept: Tensor
    n: int


def _gather_seq(x: Tensor, kept: Tensor, dim: int = 1) -> Tensor:
    """``x`` with its sequence dimension ``dim`` (length N) read at ``kept`` ``(B, k)``; a
    batch dimension of 1 is broadcast to B first."""
    b, k = kept.shape
    x = x.expand(b, *x.shape[1:]) if x.shape[0] == 1 and b > 1 else x
    shape = [1] * x.dim()
    shape[0], shape[dim] = b, k
    index = kept.view(shape).expand(*[k if d == dim else s for d, s in enumerate(x.shape)])
    return x.gather(dim, index.to(x.device))


def _mask_columns(mask: Tensor, cut: _Cut) -> Tensor:
    """A ``(B|1, 1, q, n + t)`` mask of a continuation, read at the kept prompt columns then every
    column after the prompt: ``(B, 1, q, k + t)``."""
    later = torch.arange(cut.n, mask.shape[-1], device=cut.kept.device).expand(cut.kept.shape[0], -1)
    return _gather_seq(mask, torch.cat([cut.kept, later], dim=1), dim=3)


_HIDDEN = "hidden_states"
#: the names a layer's forward takes its cache by, across families
_CACHES = ("cache", "past_key_values", "past_key_value", "layer_past")
#: the arguments a cut reads at the kept tokens; any other tensor reaching a layer is refused
_GATHERED = {_HIDDEN, "attention_mask", "position_ids", "cache_position", "position_embeddings", *_CACHES}


def _parameters(layer: nn.Module) -> tuple[str, ...]:
    """The names of a layer's forward parameters, read once per layer class."""
    return _PARAMS.setdefault(type(layer), tuple(inspect.signature(layer.forward).parameters))


_PARAMS: dict[type, tuple[str, ...]] = {}


def _bind(layer: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A layer call's arguments by name (its first parameter as ``hidden_states``)."""
    params = _parameters(layer)
    call = {**dict(zip(params, args)), **kwargs}
    call[_HIDDEN] = call.pop(params[0])
    return call


def _unbind(layer: nn.Module, call: dict[str, Any]) -> tuple[tuple, dict]:
    """Back to a call: the hidden states positional, the rest by keyword."""
    first = _parameters(layer)[0]
    rest = {k: v for k, v in call.items() if k not in (_HIDDEN, first)}
    return (call[_HIDDEN],), rest


def _check_arguments(layer: nn.Module, call: dict[str, Any]) -> None:
    """Refuse a layer that is handed a per-token tensor the cut does not know how to read."""
    for name, value in call.items():
        if name in _GATHERED:
            continue
        tensors = [value] if isinstance(value, Tensor) else \
            [v for v in value if isinstance(v, Tensor)] if isinstance(value, (tuple, list)) else []
        if tensors:
            raise UnsupportedModelError(
                f"{type(layer).__name__} is handed {name!r} beside its hidden states, which a prompt cut does not know "
                "how to read at the kept tokens (e.g. ALiBi biases); cutting the prompt supports layers that take "
                "hidden states, the attention mask and rotary position embeddings (Llama, Qwen, Gemma, OPT, GPT-2, "
                "...). Prune this model's KV cache instead (prunekit.kv)")


class _CutLayer(DynamicLayer):
    """Layer 0's cache when the prompt is cut before the first layer: it stores the kept tokens
    and counts the ``dropped`` ones, so positions keep counting every prompt token, and sizes the
    mask as :class:`~prunekit.kv.kvcache.KVLayer` does (the stored entries just before the new
    tokens, which needs an unpadded batch)."""

    is_croppable = False

    def __init__(self, dropped: int) -> None:
        super().__init__()
        self.dropped = dropped

    def get_seq_length(self) -> int:
        return super().get_seq_length() + self.dropped

    def get_mask_sizes(self, query_length: int | Tensor) -> tuple[int, int]:
        if isinstance(query_length, Tensor):  # transformers 4.x passes the forward's cache_position
            query_length = query_length.shape[0]
        return super().get_seq_length() + query_length, self.dropped


def _attention_of(layer: nn.Module) -> nn.Module:
    found = [m for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)
             and type(m).__name__.endswith("Attention")]
    if not found:
        raise UnsupportedModelError(f"{type(layer).__name__} has no *Attention module with a layer_idx; FastV cannot "
                                    "read the attention its last prompt token pays")
    return found[0]


class PromptHandle(Handle):
    """A decoder's prompt cut by ``stage`` (see the module docstring). ``enabled`` switches it
    between forwards (:meth:`disabled` for a block); :meth:`report` gives tokens and MACs per
    layer and prefill latency against the uncut model; :meth:`remove` takes every hook away."""

    def __init__(self, model: nn.Module, stage: TokenStage) -> None:
        from ..kv.attention import check_decoder
        from ..models.decoder import find_blocks

        self.model, self.stage = model, stage
        self.method = TOKEN_METHODS.get(stage.method)
        if self.method.select is None:
            raise UnsupportedModelError(
                f"{type(model).__name__} is a decoder; token method {stage.method!r} drops and merges tokens of "
                f"bidirectional encoders. For a decoder's prompt use {DECODER_METHODS}, or prune its KV cache "
                "(prunekit.kv)")
        stage.check_prompt_amounts()
        check_decoder(model, "prompt-token pruning (fastv, divprune, random)")
        impl = getattr(model.config, "_attn_implementation", None)
        if impl not in ("eager", "sdpa"):
            raise UnsupportedModelError(
                f"{type(model).__name__} runs attention with {impl!r}; cutting its prompt gathers the attention mask "
                "as a tensor, which eager and SDPA attention take: load the model with attn_implementation='sdpa' "
                "(or 'eager')")
        self.layers = list(find_blocks(model)[1])
        self.after = stage.cut_after
        if self.after >= len(self.layers):
            raise ConfigError(f"tokens: after={self.after} leaves no layer to cut the prompt for: "
                              f"{type(model).__name__} has {len(self.layers)} layers; use 0 to {len(self.layers) - 1}")
        if "last_attn" in self.method.prompt_needs:
            self._check_fastv()
        self.enabled = True
        self._cuts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._state: tuple[str, _Cut | None] | None = None  # ("prompt" | "continue", cut) during a forward
        self._attn: Tensor | None = None
        self._last: tuple[tuple[int, ...], tuple[int, ...], int] | None = None
        self._hooks: list[Any] = []
        self._install()
        self._probe()
        self._claim()

    def _probe(self) -> None:
        """Cut a 4-token prompt once, so a family whose forward cannot follow a cut (one that
        reshapes its output to the input's length, say) is refused now, by name, not mid-run."""
        device = next(self.model.parameters()).device
        ids = torch.ones(1, 4, dtype=torch.long, device=device)
        try:
            with torch.no_grad():
                self.model(input_ids=ids, use_cache=False)
        except UnsupportedModelError:
            self.remove()
            raise
        except Exception as exc:  # noqa: BLE001 - any failure means this family cannot run a cut prompt
            self.remove()
            raise UnsupportedModelError(
                f"{type(self.model).__name__} fails when its prompt is cut ({type(exc).__name__}: {exc}); its forward "
                "depends on the prompt's length after the layers. Prune its KV cache instead (prunekit.kv)") from exc
        finally:
            self._last = None

    def _check_fastv(self) -> None:
        from ..kv.attention import check_eager

        if self.after < 1:
            raise ConfigError(f"tokens ({self.stage.method}): after=0 leaves no layer whose attention ranks the prompt "
                              "tokens; use after >= 1 (FastV's K, 2 in its paper)")
        check_eager(self.model, f"token method {self.stage.method!r}",
                    "ranks prompt tokens by the attention probabilities the last token pays")

    # ---------------------------------------------------------------------------- hooks

    def _install(self) -> None:
        self._hooks.append(self.model.register_forward_pre_hook(self._begin, with_kwargs=True))
        if "last_attn" in self.method.prompt_needs:
            attn = _attention_of(self.layers[self.after - 1])
            self._hooks.append(attn.register_forward_hook(self._read_attention))
        for i in range(self.after, len(self.layers)):
            self._hooks.append(self.layers[i].register_forward_pre_hook(
                lambda m, a, kw, i=i: self._before_layer(i, a, kw), with_kwargs=True))
        self._hooks.append(self.layers[-1].register_forward_hook(lambda m, a, out: self._end()))

    def _begin(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._state = self._attn = None
        if not self.enabled:
            return
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.ndim == 2 and not bool(mask.all()):
            raise ConfigError("prompt-token pruning got a padded batch (zeros in attention_mask): a cut would mix "
                              "padding into the tokens kept; run one prompt at a time, or batch prompts of equal "
                              "length")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and cache in self._cuts:
            self._state = ("continue", self._cuts[cache])
        elif cache is None or cache.get_seq_length() == 0:
            self._state = ("prompt", None)

    def _read_attention(self, module: nn.Module, args: tuple, out: Any) -> None:
        if self._state is None or self._state[0] != "prompt":
            return
        attn = out[1] if isinstance(out, tuple) and len(out) > 1 else None
        if not isinstance(attn, Tensor):
            raise UnsupportedModelError(
                f"{type(module).__name__} returned no attention probabilities, which token method "
                f"{self.stage.method!r} ranks the prompt by; load the model with attn_implementation=\"eager\"")
        self._attn = last_token_attention(attn)  # (B, N)

    def _cut(self, x: Tensor) -> _Cut:
        b, n = x.shape[0], x.shape[1]
        k = n - count(1.0 - self.stage.keep, n - 1)  # the last token always stays
        generator = None
        if "generator" in self.method.prompt_needs:
            generator = torch.Generator(device=x.device).manual_seed(self.stage.seed)
        kept = self.method.select(PromptTokens(x, k, self._attn, generator))  # (B, k)
        return _Cut(kept, n)

    def _before_layer(self, i: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._state is None:
            return None
        kind, cut = self._state
        call = _bind(self.layers[i], args, kwargs)
        x = call[_HIDDEN]  # (B, q, d)
        if kind == "prompt" and i == self.after:
            _check_arguments(self.layers[i], call)
            cut = self._cut(x)
            self._state = (kind, cut)
            cache = next((call[n] for n in _CACHES if call.get(n) is not None), None)
            if cache is not None:
                self._cuts[cache] = cut
                if i == 0:  # every layer is cut, layer 0 too: its cache must still count the whole prompt
                    cache.layers[0] = _CutLayer(cut.n - cut.kept.shape[1])
            call[_HIDDEN] = _gather_seq(x, cut.kept)  # (B, k, d)
        mask = call.get("attention_mask")
        if kind == "prompt":
            for name in ("position_ids", "cache_position"):
                value = call.get(name)
                if isinstance(value, Tensor):
                    call[name] = _gather_seq(value[None], cut.kept)[0] if value.dim() == 1 else \
                        _gather_seq(value, cut.kept)
            if call.get("position_embeddings") is not None:
                call["position_embeddings"] = tuple(_gather_seq(t, cut.kept) for t in call["position_embeddings"])
            if isinstance(mask, Tensor):
                call["attention_mask"] = _gather_seq(_gather_seq(mask, cut.kept, 2), cut.kept, 3)  # (B, 1, k, k)
        elif isinstance(mask, Tensor) and self.after > 0:  # cut at 0, layer 0 already sized the mask compact
            call["attention_mask"] = _mask_columns(mask, cut)
        return _unbind(self.layers[i], call)

    def _end(self) -> None:
        if self._state is not None and self._state[0] == "prompt" and self._state[1] is not None:
            n, k = self._state[1].n, self._state[1].kept.shape[1]
            depth = len(self.layers)
            self._last = (tuple(n if i < self.after else k for i in range(depth)),
                          tuple(n if i < self.after - 1 else k for i in range(depth)), n)
        self._state = self._attn = None

    def _reset(self) -> None:
        self._state = self._attn = None

    # ------------------------------------------------------------------------ public

    def cut(self, cache: Any) -> Tensor | None:
        """The kept prompt indices ``(B, k)`` of the prompt ``cache`` holds (None if it holds none cut)."""
        found = self._cuts.get(cache)
        return None if found is None else found.kept

    def layer_macs(self, n: int) -> tuple[int, ...]:
        """Multiply-accumulates of each layer on ``n`` prompt tokens: every Linear in it (experts
        included) and the two attention matmuls over the full ``n x n`` score matrix."""
        out = []
        for layer in self.layers:
            linear = sum(m.weight.numel() for m in layer.modules() if isinstance(m, nn.Linear))
            attn = _attention_of(layer)
            q_proj = getattr(attn, "q_proj", None)
            width = q_proj.out_features if isinstance(q_proj, nn.Linear) else self.model.config.hidden_size
            out.append(n * linear + 2 * n * n * width)
        return tuple(out)

    def _report(self, latency: float | None, dense: float | None) -> TokenReport:
        """The last cut prompt's tokens and MACs per layer (the layers before the cut see all)."""
        tokens_in, tokens_out, n = self._last
        cut, full = self.layer_macs(tokens_in[-1]), self.layer_macs(n)
        macs = tuple(full[i] if i < self.after else cut[i] for i in range(len(self.layers)))
        return TokenReport(self.stage.method, tokens_in, tokens_out, macs, full, latency, dense)


__all__ = ["DECODER_METHODS", "PromptHandle"]

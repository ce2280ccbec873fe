"""What a KV-cache policy needs from the model, checked up front, and the hooks that give it.

Attention probabilities come from the model itself, unedited: with ``attn_implementation="eager"``
every Hugging Face attention module returns ``(output, probabilities)``, and a forward hook on it
reads them ``(B, Hq, q, n)``. SDPA and flash attention never form the probabilities, so a policy
that scores by attention refuses such a model and names the switch. Recomputing ``q·k`` from a
hook would work under SDPA too, but it needs each family's query path (norms, RoPE variants,
scaling, soft-capping) outside ``models/``: one wrong detail would score silently wrong tokens.

Hooks act only on forwards that pass *their* cache (``cache=`` / ``past_key_values=``), hold it
by a weak reference, and are removed by :meth:`KVCache.close` or when the cache is collected,
so a forgotten cache changes nothing else the model runs.
"""
from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import ConfigError, UnsupportedModelError

if TYPE_CHECKING:
    from .kvcache import KVCache


class NeedsEagerAttention(UnsupportedModelError):
    """A policy scores tokens by attention probabilities, which the model's attention kernel never forms."""


def eager_hint(model: nn.Module) -> str:
    switch = ' or call model.set_attn_implementation("eager")' if hasattr(model, "set_attn_implementation") else ""
    return f'load the model with attn_implementation="eager"{switch}'


def check_decoder(model: nn.Module, what: str = "KV-cache policies") -> Any:
    """The decoder config of a generative decoder-only model whose every layer is full attention;
    anything else is refused by name (``what``: the feature that needs it, for the message)."""
    config = getattr(model, "config", None)
    name = type(model).__name__
    if config is None:
        raise UnsupportedModelError(f"{name} has no Hugging Face config; KV-cache policies plug into a transformers "
                                    "causal LM's cache (AutoModelForCausalLM)")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{name} is an encoder-decoder model; KV-cache policies prune a decoder-only "
                                    "model's self-attention cache (load a causal LM with AutoModelForCausalLM)")
    can_generate = getattr(model, "can_generate", None)
    if not (callable(can_generate) and can_generate()):
        raise UnsupportedModelError(f"{name} is not a generative decoder (it has no generate()): KV-cache policies "
                                    "act on a causal LM's cache; load it with AutoModelForCausalLM")
    from transformers.cache_utils import get_layer_types_and_kwargs

    text = config.get_text_config(decoder=True)
    kinds = get_layer_types_and_kwargs(text)[0]
    other = sorted({k for k in kinds if k != "full_attention"})
    if other:
        raise UnsupportedModelError(f"{name} has {', '.join(other)} layers ({config.model_type}); {what} "
                                    "support models whose every layer is full attention (their cache already "
                                    "drops tokens; set config.sliding_window=None only if the model was trained "
                                    "without one)")
    return text


def check_eager(model: nn.Module, who: str, reads: str = "scores cached tokens by the attention probabilities "
                "they receive") -> None:
    """Refuse ``model`` unless it runs eager attention: ``who`` (``policy 'h2o'``) ``reads`` the
    probabilities, which SDPA and flash attention never form."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != "eager":
        raise NeedsEagerAttention(f"{who} {reads}, which {type(model).__name__}'s {impl!r} attention never forms; "
                                  f"{eager_hint(model)}")


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every layer, by the ``layer_idx`` it passes to ``cache.update``."""
    found = [m for m in model.modules()
             if isinstance(getattr(m, "layer_idx", None), int) and type(m).__name__.endswith("Attention")]
    if not found:
        raise UnsupportedModelError(f"{type(model).__name__} has no attention module with a layer_idx (found no "
                                    "*Attention module); the attention hook cannot find where the cache is read")
    return found


def _uses(ref: weakref.ref, kwargs: dict[str, Any]) -> KVCache | None:
    cache = ref()
    if cache is None:
        return None
    return cache if kwargs.get("cache") is cache or kwargs.get("past_key_values") is cache else None


def _padding_check(ref: weakref.ref) -> Callable[..., None]:
    def before(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if _uses(ref, kwargs) is None:
            return
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim == 2 and not bool(mask.all()):
            raise ConfigError(
                "a KV policy that evicts tokens got a padded batch (zeros in attention_mask): the mask is read by "
                "the positions of the most recent tokens, so evicted and padded entries would mix; generate one "
                "sequence at a time, or batch prompts of equal length")

    return before


def _attention_reader(ref: weakref.ref, model_name: str, hint: str) -> Callable[..., None]:
    def after(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        cache = _uses(ref, kwargs)
        if cache is None:
            return
        attn = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if not isinstance(attn, torch.Tensor):
            raise NeedsEagerAttention(
                f"{type(module).__name__} (layer {module.layer_idx}) of {model_name} returned no attention "
                f"probabilities, which policy {cache.policy.name!r} needs; {hint}")
        cache.after_attention(module.layer_idx, attn)

    return after


def attach(cache: KVCache, model: nn.Module) -> list[RemovableHandle]:
    """Register the hooks ``cache``'s policy needs on ``model``; they go when the cache does."""
    ref = weakref.ref(cache)
    handles = []
    if cache.policy.evicts:
        handles.append(model.register_forward_pre_hook(_padding_check(ref), with_kwargs=True))
    if cache.policy.needs_attention:
        reader = _attention_reader(ref, type(model).__name__, eager_hint(model))
        handles += [m.register_forward_hook(reader, with_kwargs=True) for m in attention_modules(model)]
    weakref.finalize(cache, _remove, handles)
    return handles


def _remove(handles: list[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()


__all__ = ["NeedsEagerAttention", "check_decoder", "check_eager", "attention_modules", "attach"]

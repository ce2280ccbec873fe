"""Model adapters: what prunekit knows about a family, in one registry. Per family: where the
blocks are, how attention is laid out (query/key/value/fused projections, head-count
attributes), which MLP layer gives the intermediate width, which config fields hold sizes
(and so how a pruned config is rewritten), the config's bias switches, and how many experts a
config declares. Structural removal, saving, reloading and one-shot pruning ask the adapter of
the model in hand (:func:`adapter_for`) instead of matching names themselves.

``generic`` covers every family that uses the common Hugging Face names (Llama, Mistral,
Qwen, Gemma, OLMo, Phi, Mixtral, ...); an entry overrides only what its family names
differently. A new family is one entry here.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import nn

from ..errors import UnsupportedModelError
from ..registry import Registry


@dataclass(frozen=True)
class AttentionLayout:
    """Names of an attention module's projections (first match wins) and head-count attributes."""

    query: tuple[str, ...] = ("q_proj", "query", "q", "q_lin", "to_q")
    key: tuple[str, ...] = ("k_proj", "key", "k", "k_lin", "to_k")
    fused: tuple[str, ...] = ("c_attn", "qkv", "query_key_value", "Wqkv", "to_qkv")
    head_attrs: tuple[str, ...] = ("num_heads", "num_attention_heads", "n_head", "n_heads", "heads")
    kv_attrs: tuple[str, ...] = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")


@dataclass(frozen=True)
class Adapter:
    """A family's layout. ``model_types``: the ``config.model_type`` values it serves (empty:
    the fallback). ``blocks``: dotted path of the block list (None: the ModuleList holding most
    parameters). ``mlp_up``: the layer whose output width is the MLP's intermediate size.
    ``sizes``: config fields per size kind. ``bias_switches``: config flags that give a family of
    layers biases. ``layer_index``: the per-block attribute renumbered when blocks go."""

    name: str
    model_types: tuple[str, ...] = ()
    blocks: str | None = None
    attention: AttentionLayout = field(default_factory=AttentionLayout)
    mlp_up: tuple[str, ...] = ("up_proj", "fc1", "c_fc", "w1", "dense_h_to_4h")
    sizes: dict[str, tuple[str, ...]] = field(default_factory=lambda: {
        "intermediate": ("intermediate_size", "ffn_dim", "n_inner"),
        "heads": ("num_attention_heads",),
        "kv_heads": ("num_key_value_heads",),
        "hidden": ("hidden_size",),
        "layers": ("num_hidden_layers",),
        "experts": ("num_experts", "num_local_experts", "n_routed_experts"),
    })
    bias_switches: tuple[str, ...] = ("mlp_bias", "attention_bias")
    layer_index: str = "layer_idx"

    @property
    def size_fields(self) -> set[str]:
        return {f for fields_ in self.sizes.values() for f in fields_}


ADAPTERS: Registry[Adapter] = Registry("model adapter", "adapters")
GENERIC = Adapter("generic")


def register_adapter(adapter: Adapter, description: str) -> Adapter:
    """Register a family's adapter; ``description``: one line for ``prunekit list`` (an
    adapter is data, with no docstring of its own)."""
    return ADAPTERS.register(adapter.name, description=description)(adapter)


register_adapter(GENERIC, "Fallback: common HF names (Llama, Qwen, ...)")
register_adapter(replace(GENERIC, name="gpt2", model_types=("gpt2",), blocks="transformer.h",
                         sizes={**GENERIC.sizes, "intermediate": ("n_inner",), "heads": ("n_head",),
                                "hidden": ("n_embd",), "layers": ("n_layer",)}),
                 "GPT-2: blocks at transformer.h, fused c_attn")
register_adapter(replace(GENERIC, name="opt", model_types=("opt",), blocks="model.decoder.layers",
                         sizes={**GENERIC.sizes, "intermediate": ("ffn_dim",)}),
                 "OPT: blocks at model.decoder.layers")
register_adapter(replace(GENERIC, name="bert", model_types=("bert",), blocks="encoder.layer",
                         mlp_up=("intermediate.dense",),
                         attention=replace(AttentionLayout(), head_attrs=("num_attention_heads",))),
                 "BERT (encoder-only): blocks at encoder.layer")

#: families with two stacks: pruning one silently would leave a half-pruned model
ENCODER_DECODER_HINT = ("prunekit prunes decoder-only (and encoder-only) models block by block; prune the "
                        "encoder or the decoder as its own model (e.g. model.get_encoder())")


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of ``model``'s family (``config.model_type``), else the generic one."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for name in ADAPTERS.names():
        adapter = ADAPTERS.get(name)
        if model_type in adapter.model_types:
            return adapter
    return GENERIC


def check_single_stack(model: nn.Module) -> None:
    """Refuse an encoder-decoder model instead of reducing it to one of its stacks."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
        stacks = [n for n in lists if not any(n.startswith(o + ".") for o in lists)]
        raise UnsupportedModelError(
            f"{type(model).__name__} is an encoder-decoder model (stacks: {', '.join(stacks[:4])}); "
            + ENCODER_DECODER_HINT)


__all__ = ["Adapter", "AttentionLayout", "ADAPTERS", "GENERIC", "adapter_for", "register_adapter",
           "check_single_stack"]

"""Tiny random builds of every causal-LM architecture the installed transformers ships.

The list comes from transformers' own auto-mapping (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``),
not from a hand-kept list, so a new release is covered the day it is installed. Each
family's default config is shrunk field by field (hidden 64, 4 layers, 4 query / 2 key-value
heads, 4 experts...): a few hundred thousand parameters, a forward pass in milliseconds.
Used by the breadth tests and ``benchmarks/breadth``; handy to check that a new
architecture prunes before downloading its weights.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: Sizes every family gets where its config has the field (names as the config spells them
#: or maps them with ``attribute_map``).
SIZES: dict[str, Any] = {
    "vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "intermediate_size": 128, "head_dim": 16, "max_position_embeddings": 512,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_k": 2, "top_k": 2, "moe_topk": 2, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32, "n_shared_experts": 1, "num_shared_experts": 1,
    "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 16,
    "state_size": 8, "ssm_state_size": 8, "d_state": 8, "mamba_d_state": 8, "conv_kernel": 4,
    "mamba_d_conv": 4, "time_step_rank": 8, "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_head_dim": 16,
    "mamba_n_groups": 1, "n_groups": 1, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "sliding_window": 64,
    "attention_window_size": 64, "block_width": 16, "lru_width": 64, "num_key_value_groups": 2,
    "global_attn_every_n_layers": 2, "n_positions": 512, "n_ctx": 512,
    "d_model": 64, "decoder_layers": 4, "encoder_layers": 2, "decoder_attention_heads": 4,
    "encoder_attention_heads": 4, "decoder_ffn_dim": 128, "encoder_ffn_dim": 128, "n_embd": 64,
    "n_layer": 4, "n_head": 4, "n_inner": 128, "ffn_dim": 128, "num_layers": 4, "num_heads": 4,
    "d_ff": 128, "d_kv": 16, "embed_dim": 64, "hidden_dim": 128, "ffn_hidden_size": 128,
    "kv_channels": 16, "linear_head_dim": 16, "o_lora_rank": 16, "index_head_dim": 16, "index_topk": 16,
    "dim_head": 16, "dim_ff": 128, "dim_model": 64, "multi_query_group_num": 2, "num_kv_heads": 2, "n_kv_heads": 2,
    "projection_dim": 64, "rotary_dim": 8, "partial_rotary_factor": None, "embedding_size": 64, "dff": 128,
}
#: Fields that must stay consistent with the sizes above in families that have them.
FAMILY: dict[str, dict[str, Any]] = {
    "mamba2": {"num_heads": 8, "head_dim": 16, "expand": 2},
    "falcon_mamba": {"expand": 2},
    "mamba": {"expand": 2},
    "rwkv": {"attention_hidden_size": 64, "intermediate_size": 128},
    "gpt_oss": {"num_local_experts": 4},
}


def causal_lm_types() -> list[str]:
    """Every ``model_type`` transformers maps to a causal-LM class, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _shrink(config: Any, sizes: dict[str, Any]) -> None:
    if hasattr(config, "kv_lora_rank"):  # multi-head latent attention: keys and values have every head
        sizes = {**sizes, "num_key_value_heads": sizes["num_attention_heads"]}
    layers = getattr(config, "num_hidden_layers", None)
    for key, value in sizes.items():
        if key in ("num_hidden_layers",):
            continue
        if hasattr(config, key) and (getattr(config, key) is None or isinstance(getattr(config, key), int)):
            if getattr(config, key) is None and key not in ("head_dim", "sliding_window", "n_group", "topk_group", "num_experts_per_tok"):
                continue
            try:
                setattr(config, key, value)
            except (AttributeError, TypeError, ValueError):
                pass
    width = sizes["intermediate_size"]
    for key, value in list(vars(config).items()):  # any other feed-forward width (ergo's first_dense_...)
        if key.endswith("intermediate_size") and key not in sizes and isinstance(value, int) and value > width:
            setattr(config, key, width)
    n = sizes["num_hidden_layers"]
    if isinstance(layers, int):
        _per_layer(config, layers, n)
        try:
            config.num_hidden_layers = n
        except (AttributeError, ValueError):
            pass
    for key in list(vars(config)):  # special tokens inside the small vocabulary
        value = getattr(config, key, None)
        if key.endswith("token_id") and isinstance(value, int) and value >= sizes["vocab_size"]:
            setattr(config, key, 1)


def _per_layer(config: Any, old: int, new: int) -> None:
    """Per-layer lists and pattern strings (hybrid layouts) cut to ``new`` layers, keeping one
    layer of each kind where possible."""
    for key, value in list(vars(config).items()):
        if isinstance(value, (list, tuple, str)) and len(value) == old and old > new and key != "model_type":
            seq = list(value)
            firsts = [seq.index(k) for k in dict.fromkeys(seq)][:new]
            rest = [i for i in range(old) if i not in firsts][: new - len(firsts)]
            picked = [seq[i] for i in sorted(firsts + rest)]
            cut = "".join(picked) if isinstance(value, str) else type(value)(picked)
            setattr(config, key, cut)
        elif key.endswith(("_layers", "_layer_ids", "layers_block_type")) and isinstance(value, list) and \
                all(isinstance(v, int) for v in value):
            setattr(config, key, [v for v in value if v < new])


def tiny_config(model_type: str) -> Any:
    """The family's default config, shrunk (its nested text config too)."""
    from transformers import CONFIG_MAPPING

    from transformers import PretrainedConfig

    config = CONFIG_MAPPING[model_type]()
    sizes = {k: v for k, v in {**SIZES, **FAMILY.get(model_type, {})}.items() if v is not None}
    for inner in list(vars(config).values()):
        if isinstance(inner, PretrainedConfig):
            _shrink(inner, sizes)
    _shrink(config, sizes)
    for flag in ("use_cache",):
        if hasattr(config, flag):
            setattr(config, flag, False)
    if hasattr(config, "tie_word_embeddings"):
        config.tie_word_embeddings = False
    return config


def tiny_causal_lm(model_type: str, seed: int = 0) -> nn.Module:
    """A tiny random causal LM of ``model_type``, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()


__all__ = ["causal_lm_types", "tiny_config", "tiny_causal_lm", "SIZES"]

"""Attention-head pruning on layouts with per-head or whole-width q/k norms and few key/value
heads: Gemma 3 and Qwen3 (a q/k RMSNorm of size head_dim shared by every head), OLMo 2 (a
q/k RMSNorm over all heads' concatenated width), with one or two key/value heads.

The reference is an independent mask: the removed query heads' q_proj rows and o_proj input
columns (and, for a key/value group, its k_proj/v_proj rows) set to zero on a deep copy.
Which heads went is read back from the pruned weights, not from the graph.
"""
from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf

from prunekit.errors import ConfigError
from prunekit.structural import StructureConfig, build_graph, prune_structure

IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
INPUTS = {"input_ids": IDS, "use_cache": False}
HEAD_DIM = 16


def tiny(family: str, kv: int, attn: str | None = None) -> torch.nn.Module:
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=kv, max_position_embeddings=512)
    if family == "gemma3":
        cfg = tf.Gemma3TextConfig(**common, head_dim=HEAD_DIM, sliding_window=16,
                                  layer_types=["sliding_attention", "full_attention"])
    elif family == "qwen3":
        cfg = tf.Qwen3Config(**common, head_dim=HEAD_DIM)
    elif family == "olmo2":  # head_dim = hidden_size / heads = 16
        cfg = tf.Olmo2Config(**common, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    else:
        raise ValueError(family)
    if attn is not None:
        cfg._attn_implementation = attn
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**INPUTS).logits


def blocks(w: torch.Tensor) -> list[torch.Tensor]:
    return list(w.detach().view(-1, HEAD_DIM, w.shape[-1]))  # (heads, head_dim, in)


def kept_heads(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    """Which head of ``before`` each head of ``after`` is (by its projection rows)."""
    old = blocks(before)
    return [next(i for i, b in enumerate(old) if torch.equal(b, a)) for a in blocks(after)]


def masked(original: torch.nn.Module, pruned: torch.nn.Module) -> torch.nn.Module:
    """``original`` with every head that ``pruned`` lacks zeroed: q_proj rows and o_proj
    columns of removed query heads, k_proj/v_proj rows of removed key/value heads."""
    ref = copy.deepcopy(original)
    with torch.no_grad():
        for a, p in zip(ref.model.layers, pruned.model.layers):
            a, p = a.self_attn, p.self_attn
            for h in set(range(a.q_proj.out_features // HEAD_DIM)) - set(kept_heads(a.q_proj.weight, p.q_proj.weight)):
                a.q_proj.weight[h * HEAD_DIM:(h + 1) * HEAD_DIM] = 0
                a.o_proj.weight[:, h * HEAD_DIM:(h + 1) * HEAD_DIM] = 0
            for h in set(range(a.k_proj.out_features // HEAD_DIM)) - set(kept_heads(a.k_proj.weight, p.k_proj.weight)):
                a.k_proj.weight[h * HEAD_DIM:(h + 1) * HEAD_DIM] = 0
                a.v_proj.weight[h * HEAD_DIM:(h + 1) * HEAD_DIM] = 0
    return ref


def heads_of(model: torch.nn.Module) -> list[tuple[int, int]]:
    """(query heads, key/value heads) per layer, from the weights."""
    return [(layer.self_attn.q_proj.weight.shape[0] // HEAD_DIM, layer.self_attn.k_proj.weight.shape[0] // HEAD_DIM)
            for layer in model.model.layers]


def prune(model: torch.nn.Module, heads: str, ratio: float = 0.5):
    reference = copy.deepcopy(model)
    result = prune_structure(model, StructureConfig("heads", ratio, "l2", heads=heads), example_inputs=INPUTS)
    return result, masked(reference, model), reference


def assert_exact(result, model, reference_masked) -> None:
    assert result.report["exact"] is True
    torch.testing.assert_close(logits(model), logits(reference_masked), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["gemma3", "qwen3"])
def test_one_kv_head_loses_query_heads_exactly(family, attn):
    """The regression: one key/value head (its query heads are sub-units of one unit) and a
    head_dim norm shared by every head used to leave no heads group at all."""
    model = tiny(family, kv=1, attn=attn)
    graph = build_graph(model, INPUTS)
    groups = graph.of_kind("heads")
    assert [len(g) for g in groups] == [1, 1] and all(len(g.sub_units[0]) == 4 for g in groups)
    assert not any(g.inexact for g in groups)
    assert not any(m.param.endswith("q_norm.weight") for g in graph.groups for u in g.units for m in u)
    result, ref, original = prune(model, "query")
    assert heads_of(model) == [(2, 1), (2, 1)]
    assert [g["removed"] for g in result.report["groups"]] == [2, 2]
    assert model.model.layers[0].self_attn.q_norm.weight.shape == (HEAD_DIM,)  # shared: never sliced
    assert_exact(result, model, ref)
    assert not torch.allclose(logits(model), logits(original), atol=1e-3)  # something was removed


@pytest.mark.parametrize("family", ["gemma3", "qwen3"])
def test_kv_on_one_kv_head_names_the_fix(family):
    model = tiny(family, kv=1)
    with pytest.raises(ConfigError, match=r"self_attn has one key/value head.*use --heads query"):
        prune_structure(model, StructureConfig("heads", 0.5, "l2", heads="kv"), example_inputs=INPUTS)
    with pytest.raises(ConfigError, match="one key/value head"):
        prune_structure(model, StructureConfig("heads", 0.25, "l2", heads="kv"), example_inputs=INPUTS)  # not a no-op
    assert heads_of(model) == [(4, 1), (4, 1)]


@pytest.mark.parametrize("family", ["gemma3", "qwen3"])
def test_auto_heads_prunes_query_heads_of_one_kv_head_exactly(family):
    """The default, heads='auto': with one key/value head per layer (multi-query attention)
    the query heads go, the same number per layer, exactly."""
    model = tiny(family, kv=1)
    reference = copy.deepcopy(model)
    result = prune_structure(model, StructureConfig("heads", 0.5, "l2"), example_inputs=INPUTS)
    assert heads_of(model) == [(2, 1), (2, 1)]
    assert all("removed_query_heads" in g for g in result.report["groups"])
    assert_exact(result, model, masked(reference, model))


@pytest.mark.parametrize("family", ["gemma3", "qwen3"])
def test_two_kv_heads_kv_and_query_exact(family):
    model = tiny(family, kv=2)
    result, ref, _ = prune(model, "kv")
    assert heads_of(model) == [(2, 1), (2, 1)]
    assert_exact(result, model, ref)
    assert model.model.layers[0].self_attn.k_norm.weight.shape == (HEAD_DIM,)
    model = tiny(family, kv=2)
    result, ref, _ = prune(model, "query")
    assert heads_of(model) == [(2, 2), (2, 2)]  # one query head from each key/value group
    attn = model.model.layers[0].self_attn
    assert attn.num_key_value_groups == 1
    assert_exact(result, model, ref)


@pytest.mark.parametrize("kv", [1, 2])
def test_olmo2_norm_over_all_heads_is_flagged_inexact(kv):
    """OLMo 2 normalises q (and k) over every head's width at once: removing a head changes
    the RMS the others are divided by, so the pruned model differs from the masked one and
    the graph must say so."""
    model = tiny("olmo2", kv=kv)
    groups = build_graph(model, INPUTS).of_kind("heads")
    assert [len(g) for g in groups] == [kv, kv] and all(g.inexact for g in groups)
    modes = ["query", "kv"] if kv > 1 else ["query"]
    for mode in modes:
        model = tiny("olmo2", kv=kv)
        result, ref, _ = prune(model, mode)
        assert heads_of(model) == [(2, kv if mode == "query" else 1)] * 2
        assert model.model.layers[0].self_attn.q_norm.weight.shape == (2 * HEAD_DIM,)  # sliced with its heads
        assert result.report["exact"] is False and all(g["inexact"] for g in result.report["groups"])
        out, want = logits(model), logits(ref)
        assert torch.isfinite(out).all() and out.shape == want.shape
        assert (out - want).abs().max() > 1e-4  # really inexact: the flag is not a false alarm

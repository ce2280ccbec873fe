"""Model adapters: one registry of what prunekit knows per family, asked by every module."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from prunekit.config import PruneConfig
from prunekit.errors import UnsupportedModelError
from prunekit.models.adapters import ADAPTERS, adapter_for
from prunekit.models.decoder import find_blocks
from prunekit.schedules import prune_oneshot


@pytest.mark.parametrize("family,adapter,blocks", [("llama", "generic", "model.layers"), ("gpt2", "gpt2", "transformer.h"),
                                                   ("opt", "opt", "model.decoder.layers"), ("qwen3", "generic", "model.layers")])
def test_each_family_gets_its_adapter_and_blocks(family, adapter, blocks):
    model = tiny_model(family)
    assert adapter_for(model).name == adapter
    assert find_blocks(model)[0] == blocks


def test_an_encoder_decoder_is_refused_not_reduced_to_one_stack():
    import transformers as tf

    cfg = tf.T5Config(vocab_size=64, d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2, d_kv=16)
    model = tf.T5ForConditionalGeneration(cfg).eval()
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(UnsupportedModelError, match=r"encoder-decoder model \(stacks: encoder\.block, decoder\.block"):
        prune_oneshot(model, PruneConfig.from_method("magnitude"))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_adapters_are_listed():
    import prunekit

    assert {"generic", "gpt2", "opt", "bert"} <= set(prunekit.list("adapters"))
    assert set(ADAPTERS.names()) == set(prunekit.list("adapters"))

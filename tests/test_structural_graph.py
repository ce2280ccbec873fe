"""The dependency graph and physical removal: on every supported architecture the pruned
model's outputs equal the masked model's exactly."""
from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from conftest import FAMILIES, tiny_model, tiny_moe
from prunekit.errors import ConfigError, StructureError
from prunekit.models.zoo import ZOO, example_input
from prunekit.structural import StructureConfig, build_graph, mask_units, prune_structure, remove_units
from prunekit.structural.layers import remove_blocks, skip_blocks

IDS = {"input_ids": torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0)), "use_cache": False}
HF_KINDS = {"neurons", "heads", "width"}


def logits(model, inputs):
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out.logits if hasattr(out, "logits") else out


def some_units(graph, kind, fraction=3, sub=False):
    """Every ``fraction``-th unit of each group of ``kind`` (never all of a group)."""
    units = []
    for g in graph.of_kind(kind):
        pool = [s for u in g.sub_units for s in u[:1]] if sub else g.units
        units += pool[:: fraction][: len(g) - 1 if not sub else None]
    return units


def assert_removal_equals_masking(model, inputs, units, exact=True):
    masked = mask_units(model, units)
    pruned = copy.deepcopy(model)
    remove_units(pruned, units)
    a, b = logits(masked, inputs), logits(pruned, inputs)
    assert a.shape == b.shape
    if exact:
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    return pruned


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_decoder_graph_and_exact_removal(family):
    model = tiny_model(family)
    start = time.perf_counter()
    graph = build_graph(model, IDS)
    assert time.perf_counter() - start < 2.0
    kinds = {g.kind for g in graph.groups}
    assert kinds == HF_KINDS, graph.summary()
    neurons = graph.of_kind("neurons")
    assert len(neurons) == 2 and all(len(g) == (256 if family == "gpt2" else 128) for g in neurons)
    heads = graph.of_kind("heads")
    kv = getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads
    assert len(heads) == 2 and all(len(g) == kv for g in heads)
    for kind in ("neurons", "heads"):
        group = graph.of_kind(kind)[0]
        assert not group.inexact
        assert_removal_equals_masking(model, IDS, some_units(graph, kind))
    (width,) = graph.of_kind("width")
    assert width.inexact  # norms average over the hidden width: close to, not equal to, masking
    pruned = assert_removal_equals_masking(model, IDS, some_units(graph, "width", 4), exact=False)
    assert torch.isfinite(logits(pruned, IDS)).all()


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3", "phi"])
def test_query_heads_keep_gqa_valid(family):
    model = tiny_model(family)
    graph = build_graph(model, IDS)
    group = graph.of_kind("heads")[0]
    assert len(group.sub_units) == len(group) and all(len(s) == 2 for s in group.sub_units)  # 4 q heads / 2 kv
    pruned = assert_removal_equals_masking(model, IDS, some_units(graph, "heads", 1, sub=True))
    attn = pruned.model.layers[0].self_attn
    assert attn.num_key_value_groups == 1 and attn.q_proj.out_features == 2 * attn.head_dim


@pytest.mark.parametrize("name", sorted(ZOO))
def test_plain_models_graph_and_exact_removal(name):
    torch.manual_seed(0)
    model = ZOO[name]().eval()
    x = example_input(name, batch=2)
    start = time.perf_counter()
    graph = build_graph(model, x)
    assert time.perf_counter() - start < 2.0
    assert graph.groups, name
    for kind in ("channels", "neurons", "heads"):
        if graph.of_kind(kind):
            assert not any(g.inexact for g in graph.of_kind(kind))
            assert_removal_equals_masking(model, x, some_units(graph, kind))


def test_cnn_coupling_facts():
    """Residual adds share channels, depthwise convs follow their input, flatten expands
    each channel into its spatial features, concatenation keeps both sources' channels."""
    torch.manual_seed(0)
    cnn = ZOO["smallcnn"]().eval()
    x = example_input("smallcnn")
    graph = build_graph(cnn, x)
    last = max(graph.of_kind("channels"), key=lambda g: [m.param for m in g.units[0]].count("fc1.weight"))
    fc = [m for m in last.units[0] if m.param == "fc1.weight"][0]
    before = cnn.fc1.in_features
    remove_units(cnn, [last.units[0]])
    assert cnn.fc1.in_features == before - len(fc.index) and len(fc.index) > 1  # one channel = H*W features
    grouped = nn.Sequential(nn.Conv2d(1, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1, groups=2), nn.ReLU(), nn.Conv2d(8, 2, 1))
    graph = build_graph(grouped, torch.rand(1, 1, 4, 4))
    # a groups=2 conv: channel i of every group is one unit on each side, the group count stays
    assert [len(g) for g in graph.groups] == [4, 4]
    assert {(m.param, m.dim): m.index for m in graph.groups[0].units[1]}["0.weight", 0] == (1, 5)
    remove_units(grouped, [graph.groups[0].units[1], graph.groups[1].units[2]])
    assert (grouped[2].in_channels, grouped[2].out_channels, grouped[2].groups) == (6, 6, 2)
    depthwise = nn.Sequential(nn.Conv2d(1, 4, 1), nn.Conv2d(4, 8, 3, groups=4), nn.Conv2d(8, 2, 1))
    graph = build_graph(depthwise, torch.rand(1, 1, 6, 6))
    (group,) = graph.groups  # depthwise (multiplier 2): input channel c with its two outputs
    remove_units(depthwise, group.units[:1])
    assert (depthwise[1].in_channels, depthwise[1].out_channels, depthwise[1].groups) == (3, 6, 3)
    unet = ZOO["unet"]().eval()
    graph = build_graph(unet, example_input("unet"))
    assert len(graph.of_kind("channels")) >= 6


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma3"])
def test_layer_removal_equals_skipping(family):
    model = tiny_model(family)
    skipped = copy.deepcopy(model)
    skip_blocks(skipped, [0])
    pruned = copy.deepcopy(model)
    changes = remove_blocks(pruned, [0])
    assert pruned.config.num_hidden_layers == 1 and list(changes.values())[0] == 1  # n_layer on GPT-2
    torch.testing.assert_close(logits(pruned, IDS), logits(skipped, IDS), rtol=1e-5, atol=1e-5)


class _MaskRouter(TorchFunctionMode):
    """Reference for expert removal: the router's logits for dropped experts are -inf."""

    def __init__(self, weights, drop):
        super().__init__()
        self.weights, self.drop = weights, drop

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") == "linear" and len(args) > 1:
            for w, drop in zip(self.weights, self.drop):
                if args[1] is w:
                    out = out.clone()
                    out[..., drop] = float("-inf")
        return out


def moe_model(kind):
    return tiny_moe(kind)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "olmoe"])
def test_expert_removal_equals_router_masking(kind):
    model = moe_model(kind)
    data = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    ref = copy.deepcopy(model)
    result = prune_structure(model, StructureConfig.create("experts", 0.5), data=data)
    drops = [g["removed_indices"] for g in result.report["groups"]]
    assert all(len(d) == 2 for d in drops) and result.report["params_after"] < result.report["params_before"]
    routers = [ref.model.layers[i].mlp.gate.weight for i in range(2)]
    with _MaskRouter(routers, drops):
        expected = logits(ref, {"input_ids": data})
    torch.testing.assert_close(logits(model, {"input_ids": data}), expected, rtol=1e-4, atol=1e-4)
    assert model.model.layers[0].mlp.gate.weight.shape[0] == 2


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.b(torch.fft.fft(self.a(x)).real)


class _HardCoded(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)).view(x.shape[0], 8))


def test_untraceable_op_is_named():
    with pytest.raises(StructureError, match=r"cannot trace op 'fft_fft' \(in module '<model>'\)"):
        build_graph(_Untraceable(), torch.randn(2, 8))


def test_hard_coded_sizes_fail_clearly():
    with pytest.raises(StructureError, match="no longer runs"):
        prune_structure(_HardCoded(), StructureConfig("neurons", 0.5), example_inputs=torch.randn(2, 8))


def test_ratio_that_empties_a_group_is_refused():
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="would remove all 2 units"):
        prune_structure(model, StructureConfig("heads", 0.9, "l2"), example_inputs=IDS)
    with pytest.raises(StructureError, match="no mixture-of-experts"):
        prune_structure(model, StructureConfig.create("experts", 0.5), data=IDS["input_ids"])
    with pytest.raises(StructureError, match="no prunable neurons"):
        prune_structure(nn.Sequential(nn.Linear(4, 2)), StructureConfig("neurons", 0.5),
                        example_inputs=torch.randn(1, 4))


def hf_encoder(kind):
    import transformers as tf

    torch.manual_seed(0)
    if kind == "vit":
        cfg = tf.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=128, num_labels=10)
        return tf.ViTForImageClassification(cfg).eval(), {"pixel_values": torch.randn(2, 3, 32, 32)}
    cfg = tf.BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0  # padding must not matter
    return tf.BertModel(cfg).eval(), {"input_ids": IDS["input_ids"], "attention_mask": mask}


@pytest.mark.parametrize("kind", ["vit", "bert"])
def test_hf_encoders_graph_and_exact_removal(kind):
    model, inputs = hf_encoder(kind)
    graph = build_graph(model, inputs)
    assert {"heads", "neurons"} <= {g.kind for g in graph.groups}
    # a classifier's hidden width feeds its head (prunable, inexact); an encoder's is its output (kept)
    assert bool(graph.of_kind("width")) == (kind == "vit")

    def out(m):
        with torch.no_grad():
            o = m(**inputs)
        return o.logits if kind == "vit" else o.last_hidden_state

    for k in ("heads", "neurons"):
        units = some_units(graph, k)
        pruned = copy.deepcopy(model)
        remove_units(pruned, units)
        torch.testing.assert_close(out(pruned), out(mask_units(model, units)), rtol=1e-5, atol=1e-5)


class _WithLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.rnn, self.b, self.c = nn.Linear(8, 16), nn.LSTM(16, 16, batch_first=True), nn.Linear(16, 32), nn.Linear(32, 2)

    def forward(self, x):
        return self.c(torch.relu(self.b(self.rnn(torch.relu(self.a(x)))[0])))


def test_unsupported_layer_is_named_and_can_be_a_black_box():
    model, x = _WithLSTM(), torch.randn(2, 5, 8)
    with pytest.raises(StructureError, match=r"'lstm' \(in module 'rnn'\).*ignore=\['\^rnn\$'\]"):
        build_graph(model, x)
    graph = build_graph(model, x, ignore=("^rnn$",))
    assert [(g.name, len(g)) for g in graph.groups] == [("b+", 32)]  # a feeds the LSTM: kept whole
    result = prune_structure(model, StructureConfig("neurons", 0.5, ignore=("^rnn$",)), example_inputs=x)
    assert model.b.out_features == 16 and model.c.in_features == 16 and model.a.out_features == 16
    assert result.report["params_after"] < result.report["params_before"]

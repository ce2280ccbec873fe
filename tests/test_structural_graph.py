"""The dependency graph and physical removal: on every supported architecture the pruned
model's outputs equal the masked model's exactly."""
from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import FAMILIES, MaskRouter, tiny_model, tiny_moe
from prunekit.errors import ConfigError, NoSuchStructure, StructureError
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
    with MaskRouter(routers, drops):
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


def test_hard_coded_sizes_fail_clearly_and_the_model_survives():
    """The failure comes after removal began: the caller's model is put back exactly."""
    torch.manual_seed(0)
    model, x = _HardCoded(), torch.randn(2, 8)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    with torch.no_grad():
        expected = model(x)
    with pytest.raises(StructureError, match="no longer runs.*restored"):
        prune_structure(model, StructureConfig("neurons", 0.5), example_inputs=x)
    assert model.a.out_features == 8 and model.b.in_features == 8
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_a_failed_head_removal_restores_a_hugging_face_model(monkeypatch):
    """A failure inside removal (after some tensors were cut) leaves the HF model, its config
    and its attention modules' head counts as they were, with the bias FLAP compensation adds."""
    from prunekit.structural import prune as prune_module

    model = tiny_model("llama")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    heads = [layer.self_attn.config.num_attention_heads for layer in model.model.layers]
    real = prune_module.remove_units

    def cut_then_fail(m, units):
        real(m, units)
        raise RuntimeError("disk full")

    monkeypatch.setattr(prune_module, "remove_units", cut_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        prune_module.prune_structure(model, StructureConfig("heads", 0.5, "flap"), data=ids)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [layer.self_attn.config.num_attention_heads for layer in model.model.layers] == heads
    assert all(layer.self_attn.o_proj.bias is None for layer in model.model.layers)
    with torch.no_grad():
        model(input_ids=ids)


def test_ratio_that_empties_a_group_is_refused():
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="would remove all 2 units"):
        prune_structure(model, StructureConfig("heads", 0.9, "l2"), example_inputs=IDS)
    with pytest.raises(StructureError, match="no mixture-of-experts"):
        prune_structure(model, StructureConfig.create("experts", 0.5), data=IDS["input_ids"])
    with pytest.raises(NoSuchStructure, match="no hidden neurons"):  # one Linear: nothing hidden
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


def test_an_lstm_is_a_black_box():
    """A fused recurrent kernel: units entering it are frozen, the rest prunes."""
    model, x = _WithLSTM(), torch.randn(2, 5, 8)
    graph = build_graph(model, x)
    assert [(g.name, len(g)) for g in graph.groups] == [("b+", 32)]  # a feeds the LSTM: kept whole
    result = prune_structure(model, StructureConfig("neurons", 0.5), example_inputs=x)
    assert model.b.out_features == 16 and model.c.in_features == 16 and model.a.out_features == 16
    assert result.report["params_after"] < result.report["params_before"]


class _Odd(nn.Module):
    """An op with no coupling rule (erfcx) inside a submodule of every block."""

    def forward(self, x):
        return torch.special.erfcx(x)


class _OddBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.act, self.down, self.fc1, self.fc2 = (nn.Linear(8, 16), _Odd(), nn.Linear(16, 8),
                                                            nn.Linear(8, 12), nn.Linear(12, 8))

    def forward(self, x):
        return x + self.down(self.act(self.up(x))) + self.fc2(torch.relu(self.fc1(x)))


class _OddNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_OddBlock(), _OddBlock()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_an_untraceable_op_names_a_fix_for_every_block_and_the_fix_gets_further():
    torch.manual_seed(0)
    model, x = _OddNet(), torch.randn(2, 5, 8)
    with pytest.raises(StructureError, match=r"'special_erfcx' \(in module 'layers.0.act'\)") as err:
        build_graph(model, x, auto_box=False)
    printed = str(err.value)
    assert r"ignore=[r'^layers\.\d+\.act$']" in printed and r"--ignore '^layers\.\d+\.act$'" in printed
    pattern = printed.split("ignore=[r'")[1].split("']")[0]
    graph = build_graph(model, x, ignore=(pattern,), auto_box=False)  # as printed: covers layer 1 too
    names = [(g.name, len(g)) for g in graph.groups]
    assert names == [("layers.0", 12), ("layers.1", 12)]  # fc1's neurons; up feeds the box: kept whole


def test_an_untraceable_module_becomes_a_black_box_by_default_and_is_reported():
    torch.manual_seed(0)
    model, x = _OddNet(), torch.randn(2, 5, 8)
    graph = build_graph(model, x)
    assert [b["modules"] for b in graph.black_boxes] == [r"^layers\.\d+\.act$"]
    assert graph.black_boxes[0]["op"] == "special_erfcx"
    assert [(g.name, len(g)) for g in graph.groups] == \
        [(g.name, len(g)) for g in build_graph(model, x, ignore=(r"^layers\.\d+\.act$",)).groups]
    reference = copy.deepcopy(model)
    result = prune_structure(model, StructureConfig("neurons", 0.5, "l2"), example_inputs=x)
    assert result.report["black_boxes"][0]["modules"] == r"^layers\.\d+\.act$"
    assert [layer.fc1.out_features for layer in model.layers] == [6, 6]
    assert [layer.up.out_features for layer in model.layers] == [16, 16]
    assert result.report["exact"] is True
    units = [g.units[i] for g in build_graph(reference, x).groups
             for e in result.report["groups"] if e["name"] == g.name for i in e["removed_indices"]]
    with torch.no_grad():
        torch.testing.assert_close(model(x), mask_units(reference, units)(x), rtol=1e-5, atol=1e-6)

class _WSConv(nn.Conv2d):
    """A weight-standardised convolution as NFNets write it (timm's ScaledStdConv2d)."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                         momentum=0.0, eps=1e-5).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class _WSNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = _WSConv(3, 8, 3, padding=1), _WSConv(8, 8, 3, padding=1), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.b(torch.relu(self.a(x))).mean((2, 3)))


def test_weight_standardisation_over_pruned_inputs_is_reported_inexact():
    """Standardising a weight over its input channels: removing some changes the rest's scale,
    so the result differs from masking and the report must say so (nfnet was called exact)."""
    torch.manual_seed(0)
    model, x = _WSNet(), torch.randn(2, 3, 8, 8)
    graph = build_graph(model, x)
    assert [(g.name, len(g), g.inexact) for g in graph.groups] == [("a+", 8, True), ("b+", 8, False)]
    reference = copy.deepcopy(model)
    result = prune_structure(model, StructureConfig("channels", 0.5, "l2"), example_inputs=x)
    assert result.report["exact"] is False
    by_name = {g.name: g for g in graph.groups}
    units = [by_name[e["name"]].units[i] for e in result.report["groups"] for i in e["removed_indices"]]
    with torch.no_grad():
        gap = float((model(x) - mask_units(reference, units)(x)).abs().max())
    assert gap > 1e-3  # really inexact: the flag is needed
    only_b = build_graph(reference, x).groups[1]
    pruned_b = copy.deepcopy(reference)
    from prunekit.structural import remove_units
    remove_units(pruned_b, only_b.units[:4])  # the exact group alone matches masking
    with torch.no_grad():
        torch.testing.assert_close(pruned_b(x), mask_units(reference, only_b.units[:4])(x), rtol=1e-5, atol=1e-5)

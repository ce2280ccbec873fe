"""Every supported decoder family (tiny random configs): the runner reproduces the model's own
block outputs, and every method prunes every target layer to the exact sparsity/pattern."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import FAMILIES, tiny_model
from prunekit.calibration import CalibrationData
from prunekit.calibration.capture import capture_block_inputs
from prunekit.config import Calibration, PruneConfig, Target
from prunekit.errors import CalibrationError, UnsupportedModelError
from prunekit.evaluate import sparsity_report
from prunekit.models import find_blocks
from prunekit.schedules import prune_oneshot

VOCAB = 256


def ids(n=8, seqlen=32, seed=0):
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_replay_reproduces_block_outputs(family):
    model = tiny_model(family)
    _, blocks = find_blocks(model)
    x = ids(4, 24)
    expected = {}
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: expected.__setitem__(i, o[0] if isinstance(o, tuple) else o))
             for i, b in enumerate(blocks)]
    with torch.no_grad():
        model(input_ids=x, use_cache=False)
    for h in hooks:
        h.remove()
    hiddens, calls = capture_block_inputs(model, blocks, CalibrationData.from_ids(x, 2))
    with torch.no_grad():
        for i, block in enumerate(blocks):
            hiddens = [calls[i][b].run(block, h) for b, h in enumerate(hiddens)]
            torch.testing.assert_close(torch.cat(hiddens), expected[i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,pattern", [("wanda", "unstructured"), ("sparsegpt", "2:4"),
                                            ("sparsegpt", "unstructured"), ("magnitude", "4:8")])
def test_prunes_every_layer_exactly(family, method, pattern):
    model = tiny_model(family)
    config = PruneConfig.from_method(method, pattern=pattern)
    prune_oneshot(model, config, ids(), progress=False)
    nm = (config.pattern.n, config.pattern.m) if config.pattern.kind == "nm" else None
    report = sparsity_report(model, nm=nm)
    assert len(report["layers"]) >= 8  # 2 blocks x (attention + MLP projections)
    for name, layer in report["layers"].items():
        out_f, in_f = layer["shape"]
        group = config.pattern.group or ("row" if method == "wanda" else "layer")
        expected = round(0.5 * in_f) / in_f if group == "row" or nm else round(0.5 * out_f * in_f) / (out_f * in_f)
        assert layer["sparsity"] == pytest.approx(expected, abs=1e-9), name
    if nm:
        assert report["nm_valid"]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids(2, 16)).logits).all()


@pytest.mark.parametrize("bs", [1, 3, 8])
def test_lockstep_is_chunking_invariant(bs):
    """Layer order with batches in lockstep equals layer order on one batch of everything."""
    a, b = tiny_model("llama"), tiny_model("llama")
    x = ids(8, 32)
    for model, size in ((a, None), (b, bs)):
        prune_oneshot(model, PruneConfig.from_method("sparsegpt", calibration=Calibration(batch_size=size)), x,
                      progress=False)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4, msg=n)


def test_lockstep_errors_propagate_without_hanging():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(CalibrationError, match="down_proj"):
        prune_oneshot(model, PruneConfig.from_method("wanda", calibration=Calibration(batch_size=2)), ids(),
                      progress=False)


def test_two_pass_is_chunking_invariant():
    a, b = tiny_model("llama"), tiny_model("llama")
    x = ids(8, 32)
    for model, bs in ((a, 2), (b, 4)):
        cfg = PruneConfig.from_method("wanda", calibration=Calibration(batch_size=bs, sequential="block"))
        prune_oneshot(model, cfg, x, progress=False)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p == 0, q == 0), n


def test_single_pass_equals_two_pass_when_layers_share_the_block_input():
    # Only q/k/v read the block's (normed) input, so pruning in order cannot change their stats.
    ignore = ("o_proj", "mlp")
    a, b = tiny_model("llama"), tiny_model("llama")
    x = ids(8, 32)
    for model, order in ((a, "layer"), (b, "block")):
        cfg = PruneConfig.from_method("sparsegpt", calibration=Calibration(sequential=order), target=Target(ignore))
        prune_oneshot(model, cfg, x, progress=False)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        if "layers.0." in n:  # block 0 sees identical inputs in both modes
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_single_pass_differs_from_dense_stats_downstream():
    """In single-pass mode later layers see already-pruned earlier layers (true sequential)."""
    a, b = tiny_model("llama"), tiny_model("llama")
    x = ids(8, 32)
    prune_oneshot(a, PruneConfig.from_method("wanda"), x, progress=False)
    prune_oneshot(b, PruneConfig.from_method("wanda", calibration=Calibration(sequential="block")), x, progress=False)
    qa, qb = a.model.layers[0].self_attn.q_proj.weight, b.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(qa == 0, qb == 0)  # first layer: same input either way
    da, db = a.model.layers[0].mlp.down_proj.weight, b.model.layers[0].mlp.down_proj.weight
    assert not torch.equal(da == 0, db == 0)  # its input depends on pruned q/k/v/o/gate/up


def test_nan_activations_are_reported():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(CalibrationError, match="NaN/Inf"):
        prune_oneshot(model, PruneConfig.from_method("wanda"), ids(), progress=False)


def test_model_without_blocks_is_rejected():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(UnsupportedModelError, match="ModuleList"):
        prune_oneshot(model, PruneConfig.from_method("magnitude"))


def test_unsupported_weight_is_left_dense_and_named_not_skipped():
    """A block holding a weight of a layer type one-shot pruning does not handle (a Conv1d
    here; Mamba's A_log, RWKV's time_mix in real models): its Linear layers are pruned and the
    rest is named in the report as left dense, not an error."""
    from prunekit.api import prune

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.conv = nn.Conv1d(8, 8, 3, padding=1)

    model = nn.Module()
    model.layers = nn.ModuleList([Block(), Block()])
    outcome = prune_oneshot(model, PruneConfig.from_method("magnitude"))
    assert outcome.left_dense == {"layers.0.conv.weight": [8, 8, 3], "layers.1.conv.weight": [8, 8, 3]}
    assert float((model.layers[0].fc.weight == 0).float().mean()) == 0.5
    assert (model.layers[0].conv.weight != 0).all()
    ignored = prune_oneshot(model, PruneConfig.from_method("magnitude", target=Target((r"\.conv",))))
    assert ignored.left_dense == {}  # ignored on purpose: not listed
    model2 = nn.Module()
    model2.layers = nn.ModuleList([Block(), Block()])
    report = prune(model2, PruneConfig.from_method("magnitude"), progress=False).report
    assert report["stages"][0]["left_dense"] == {"layers.0.conv.weight": [8, 8, 3], "layers.1.conv.weight": [8, 8, 3]}


def test_data_methods_require_data():
    from prunekit.errors import DataError

    with pytest.raises(DataError, match="calibration data"):
        prune_oneshot(tiny_model("llama"), PruneConfig.from_method("wanda"), None)


def test_nm_indivisible_layer_fails_before_any_change():
    from prunekit.errors import ConfigError

    model = tiny_model("llama")
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ConfigError, match="not divisible by M=3"):
        prune_oneshot(model, PruneConfig.from_method("magnitude", pattern="2:3"))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("alloc", ["global", "owl"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_nonuniform_allocation_hits_target(alloc, method):
    from prunekit.config import Allocation

    model = tiny_model("qwen2")
    with torch.no_grad():  # plant outlier weights in block 1
        model.model.layers[1].self_attn.q_proj.weight[:, :16] *= 50
    prune_oneshot(model, PruneConfig.from_method(method, sparsity=0.6, allocation=Allocation(alloc)), ids(),
                  progress=False)
    report = sparsity_report(model)
    assert report["sparsity"] == pytest.approx(0.6, abs=0.01)
    layers = report["layers"]
    if alloc == "owl":  # one amount per block (up to per-row rounding), the outlier-rich block pruned less
        s0 = [v["sparsity"] for n, v in layers.items() if ".layers.0." in n]
        s1 = [v["sparsity"] for n, v in layers.items() if ".layers.1." in n]
        assert max(s0) - min(s0) < 0.02 and max(s1) - min(s1) < 0.02
        assert max(s1) < min(s0)
    else:
        assert len({round(v["sparsity"], 3) for v in layers.values()}) > 1


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_a_layer_whose_calibration_inputs_are_all_zero_is_named_not_emptied(method):
    """Gemma-3n had layers that SparseGPT left 100% sparse with no word: a dead branch (its
    input multiplied by zero) is pruned by magnitude to the asked amount and named."""
    from prunekit.api import prune

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return x + self.fc2(self.fc1(x) * 0.0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    torch.manual_seed(0)
    model = Net()
    w = model.layers[0].fc2.weight.detach().clone()
    data = torch.randn(4, 6, 8)
    report = prune(model, PruneConfig.from_method(method), data=data, progress=False).report["stages"][0]
    assert report["dead_inputs"] == {"layers.0.fc2": "magnitude", "layers.1.fc2": "magnitude"}
    for layer in model.layers:
        assert float((layer.fc2.weight == 0).float().mean()) == 0.5
        assert float((layer.fc1.weight == 0).float().mean()) == 0.5
    kept = model.layers[0].fc2.weight != 0  # magnitude: the largest half of each row survives, unchanged
    assert torch.equal(model.layers[0].fc2.weight[kept], w[kept])
    assert float(w[kept].abs().min()) >= float(w[~kept].abs().max()) - 1e-6 or \
        all(float(w[r][kept[r]].abs().min()) >= float(w[r][~kept[r]].abs().max()) for r in range(8))

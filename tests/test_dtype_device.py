"""Dtype and device contracts, generated for every registry entry: element scores keep their
weight's dtype and device, patterns return bool masks where their scores are, allocations
take scores of any dtype and device, reconstructions return the weight's dtype and device
(computing in float32 inside), and statistics live where their inputs are. Tensors a
function creates go on the device of what they summarise, so each check runs on CUDA too
(marked ``gpu``; skipped cleanly on machines without one)."""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICES, tiny_model, tiny_moe
from prunekit.allocation import ALLOCATIONS, LayerRef
from prunekit.calibration import CalibrationData, InputStats
from prunekit.config import Allocation, PruneConfig, SparseGPTParams
from prunekit.patterns import PATTERNS, MaskSpec
from prunekit.reconstruct import RECONSTRUCTIONS, GroupProblem, Segment
from prunekit.schedules import prune_oneshot
from prunekit.schedules.at_init import INIT_SCORES, AtInit, prune_at_init
from prunekit.scoring import SCORES, LayerStats
from prunekit.structural import GROUP_SCORES, StructureConfig, prune_structure
from prunekit.structural.experts import EXPERT_SCORES
from prunekit.structural.layers import LAYER_SCORES

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def problem(dtype, device, score="wanda", spec=MaskSpec("unstructured", 0.5, "row")):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 32, generator=g).to(device, dtype)
    inputs = InputStats(32, gram=True, device=device)
    inputs.add(x)
    weight = torch.randn(16, 32, generator=g).to(device, dtype)
    grad = torch.randn(16, 32, generator=g).to(device, dtype)
    stats = LayerStats(input_norm=inputs.input_norm, generator=torch.Generator().manual_seed(0), grad=grad)
    return GroupProblem(weight, (Segment(0, 16, spec),), SCORES.get(score), stats, inputs, SparseGPTParams(8))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_statistics_live_where_their_inputs_are(device, dtype):
    x = torch.randn(64, 8).to(device, dtype)
    s = InputStats(8, gram=True, moments=True, device=device)
    s.add(x)
    assert s.gram.device.type == device and s.gram.dtype == torch.float32
    assert s.mean.dtype == torch.float64 and s.input_norm.device.type == device
    torch.testing.assert_close(s.gram.cpu(), (x.float().t() @ x.float()).cpu(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("score", SCORES.names())
def test_every_score_keeps_dtype_and_device(score, dtype, device):
    p = problem(dtype, device, score)
    upper, _ = p.inverse_factor()
    stats = LayerStats(p.stats.input_norm, upper.square().sum(0).sqrt(), torch.Generator().manual_seed(0), p.stats.grad)
    s = SCORES.get(score)(p.weight, stats)
    assert s.dtype == dtype and s.device.type == device and s.shape == p.weight.shape
    again = SCORES.get(score)(p.weight, LayerStats(p.stats.input_norm, stats.hinv_sqrt_diag,
                                                   torch.Generator().manual_seed(0), p.stats.grad))
    assert torch.equal(s, again)  # deterministic under a seed, on every device


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", PATTERNS.names())
def test_every_pattern_masks_where_its_scores_are(pattern, dtype, device):
    scores = torch.rand(8, 16, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    spec = MaskSpec("nm", n=2, m=4) if pattern == "nm" else MaskSpec(pattern, 0.5, "row")
    mask = spec.mask(scores)
    assert mask.dtype == torch.bool and mask.device.type == device and int(mask.sum()) == 64


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ALLOCATIONS.names())
def test_every_allocation_takes_scores_of_any_dtype_and_device(name, dtype, device):
    g = torch.Generator().manual_seed(0)
    scores = [(torch.rand(8, 8, generator=g) * (1 + i)).to(device, dtype) for i in range(4)]
    refs = [LayerRef(f"l{i}", i // 2, s.numel(), lambda s=s: s) for i, s in enumerate(scores)]
    amounts = ALLOCATIONS.get(name)(refs, 0.5, Allocation(name))
    mean = sum(a * r.numel for a, r in zip(amounts, refs)) / sum(r.numel for r in refs)
    assert mean == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reconstruction", RECONSTRUCTIONS.names())
def test_every_reconstruction_keeps_dtype_and_device(reconstruction, dtype, device):
    p = problem(dtype, device, "obs" if reconstruction == "sparsegpt" else "wanda")
    new_w, pruned = RECONSTRUCTIONS.get(reconstruction)(p)
    assert new_w.dtype == dtype and new_w.device.type == device and pruned.device.type == device
    assert ((pruned.sum(1)) == 16).all() and (new_w[pruned] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_bf16_decoder_prunes_in_bf16(method, device):
    model = tiny_model("qwen2").to(device, torch.bfloat16)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    prune_oneshot(model, PruneConfig.from_method(method), ids, progress=False)
    w = model.model.layers[0].mlp.down_proj.weight
    assert w.dtype == torch.bfloat16 and w.device.type == device
    assert float((w == 0).float().mean()) == 0.5
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids.to(device)).logits.float()).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", [m for m in GROUP_SCORES.names() if m != "bn_scale"])  # bn_scale: CNNs only
def test_every_unit_score_on_a_bf16_model(method, device):
    model = tiny_model("llama").to(device, torch.bfloat16)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    r = prune_structure(model, StructureConfig("neurons", 0.25, method, batch_size=2), data=ids)
    assert all(g["removed"] == 32 for g in r.report["groups"])
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("structure,method", [("layers", m) for m in LAYER_SCORES.names()]
                         + [("experts", m) for m in EXPERT_SCORES.names()])
def test_every_layer_and_expert_score_on_device(structure, method, device):
    model = (tiny_model("llama") if structure == "layers" else tiny_moe("mixtral")).to(device)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    r = prune_structure(model, StructureConfig(structure, 0.5, method), data=ids)
    assert all(g["removed"] == (1 if structure == "layers" else 2) for g in r.report["groups"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", INIT_SCORES.names())
def test_every_init_score_on_device(method, device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).to(device)
    x, y = torch.randn(32, 8, device=device), torch.randint(0, 4, (32,), device=device)
    masks = prune_at_init(model, AtInit(method, 0.5, iterations=2), CalibrationData.from_pairs(x, y, 16))
    assert all(m.device.type == device for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.5 * sum(m.numel() for m in masks.values()))


@pytest.mark.gpu
def test_sequential_onloading_keeps_weights_on_the_cpu():
    """A model in CPU memory, blocks computed on the GPU one at a time: same masks as on the CPU."""
    a, b = tiny_model("llama"), tiny_model("llama")
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    prune_oneshot(a, PruneConfig.from_method("sparsegpt"), ids, progress=False)
    prune_oneshot(b, PruneConfig.from_method("sparsegpt"), ids, progress=False, device="cuda")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert q.device.type == "cpu", n
        assert torch.equal(p == 0, q == 0) or (p == 0).ne(q == 0).float().mean() < 1e-3, n

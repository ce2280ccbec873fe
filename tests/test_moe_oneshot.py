"""One-shot pruning of mixture-of-experts decoders as transformers ships them (fused 3-D
expert tensors): each expert's matrix is its own problem, calibrated on exactly the tokens
routed to it; routers stay dense; experts no token reaches are named."""
from __future__ import annotations

import pytest
import torch

from conftest import MOE_FAMILIES, tiny_moe
from prunekit.api import prune
from prunekit.calibration import CalibrationData
from prunekit.config import Calibration, PruneConfig
from prunekit.models.moe import experts_layout, watch_experts
from prunekit.patterns import is_nm
from prunekit.schedules import prune_oneshot
from prunekit.targets import select_layers

IDS = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))


def experts_of(model):
    return [m for m in model.modules() if experts_layout(m) is not None]


def routing(model, ids=IDS):
    """Per experts module: the hidden states and top-k expert indices it receives (dense model)."""
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, i=i: seen.setdefault(i, []).append((a[0], a[1])))
             for i, m in enumerate(experts_of(model))]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    return {i: (torch.cat([h for h, _ in v]), torch.cat([k for _, k in v])) for i, v in seen.items()}


@pytest.mark.parametrize("kind", MOE_FAMILIES)
def test_the_expert_loop_computes_what_the_model_computes(kind):
    model = tiny_moe(kind)
    with torch.no_grad():
        ref = model(input_ids=IDS).logits
        seen = []
        handles = [watch_experts(m, lambda e, p, x: seen.append((e, p))) for m in experts_of(model)]
        out = model(input_ids=IDS).logits
        for h in handles:
            h.remove()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert seen and {p for _, p in seen} == {"gate_up_proj", "down_proj"}
    assert all("forward" not in m.__dict__ for m in experts_of(model))  # restored


@pytest.mark.parametrize("kind", MOE_FAMILIES)
@pytest.mark.parametrize("method,pattern", [("wanda", "unstructured"), ("sparsegpt", "unstructured"),
                                            ("sparsegpt", "2:4")])
def test_every_expert_is_pruned_exactly_and_routers_stay_dense(kind, method, pattern):
    model = tiny_moe(kind)
    routers = {n: p.clone() for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")}
    assert routers
    prune_oneshot(model, PruneConfig.from_method(method, pattern=pattern), IDS, progress=False)
    targets = {n: t for i, b in enumerate(model.model.layers) for n, t in select_layers(b, f"model.layers.{i}", ()).items()}
    experts = [n for n in targets if ".experts." in n]
    assert len(experts) == 2 * 2 * 4  # 2 blocks x 4 experts x (gate_up, down)
    for name, t in targets.items():
        w = t.weight()
        if pattern == "2:4":
            assert is_nm(w, 2, 4), name
            assert float((w == 0).float().mean()) == 0.5, name
        elif method == "wanda":  # per row
            assert ((w == 0).sum(1) == round(0.5 * w.shape[1])).all(), name
        else:
            assert int((w == 0).sum()) == round(0.5 * w.numel()), name
    for n, p in model.named_parameters():
        if n in routers:
            assert torch.equal(p, routers[n]), n
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=IDS).logits).all()


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_expert_statistics_come_from_exactly_the_routed_tokens(kind):
    """Block order: block 0's experts are scored on the dense block's routing. Each expert's
    Wanda mask must equal one computed by hand from the tokens routed to it."""
    model = tiny_moe(kind)
    hidden, index = routing(model)[0]  # block 0's experts module
    experts = experts_of(model)[0]
    expected = {}
    for e in range(experts_layout(experts).count):
        x = hidden[(index == e).any(-1)]  # (tokens routed to e, hidden)
        w = experts.gate_up_proj[e].detach()  # (2 * intermediate, hidden)
        score = w.abs() * x.norm(dim=0)
        k = round(0.5 * w.shape[1])
        mask = torch.zeros_like(w, dtype=torch.bool).scatter_(1, score.topk(k, dim=1, largest=False).indices, True)
        expected[e] = mask
    cfg = PruneConfig.from_method("wanda", calibration=Calibration(sequential="block", batch_size=None))
    prune_oneshot(model, cfg, IDS, progress=False)
    for e, mask in expected.items():
        assert torch.equal(experts.gate_up_proj[e] == 0, mask), e


@pytest.mark.parametrize("unreached", ["magnitude", "dense"])
def test_an_expert_no_token_reaches_is_named_and_handled(unreached):
    model = tiny_moe("mixtral", experts=4)
    with torch.no_grad():  # equal router logits: top-2 of every token is always the same two experts
        for layer in model.model.layers:
            layer.mlp.gate.weight.zero_()
    used = {int(e) for e in routing(model)[0][1].unique()}
    idle = sorted(set(range(4)) - used)
    assert idle
    before = {n: p.clone() for n, p in model.named_parameters()}
    cfg = PruneConfig.from_method("wanda", unreached=unreached)
    result = prune(model, cfg, IDS, progress=False)
    names = {f"model.layers.{i}.mlp.experts.{e}.{p}" for i in range(2) for e in idle
             for p in ("gate_up_proj", "down_proj")}
    assert set(result.report["unreached"]) == names
    for name in names:
        layer = result.report["layers"][name]
        assert layer["sparsity"] == (0.5 if unreached == "magnitude" else 0.0), name
    e = idle[0]
    w, w0 = model.model.layers[0].mlp.experts.gate_up_proj[e], before["model.layers.0.mlp.experts.gate_up_proj"][e]
    if unreached == "dense":
        assert torch.equal(w, w0)
    else:  # the largest-magnitude half of every row is kept
        kept = w0.abs().topk(w0.shape[1] // 2, dim=1).indices
        assert torch.equal(w.gather(1, kept), w0.gather(1, kept))


def test_calibration_data_from_dicts_prunes_moe():
    model = tiny_moe("olmoe")
    data = CalibrationData.from_items([{"input_ids": IDS[:4]}, {"input_ids": IDS[4:]}])
    prune_oneshot(model, PruneConfig.from_method("wanda"), data, progress=False)
    w = model.model.layers[1].mlp.experts.down_proj
    assert float((w == 0).float().mean()) == 0.5

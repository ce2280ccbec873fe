"""CalibrationData from every source, statistics that keep their precision, and structural
statistics gathered block by block through the same runner as one-shot pruning."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import ASSETS, tiny_model
from prunekit.calibration import Batch, CalibrationData, InputStats, as_calibration
from prunekit.errors import DataError
from prunekit.models.zoo import ZOO
from prunekit.structural import StructureConfig, prune_structure
from prunekit.structural.config import default_method
from prunekit.structural.stats import input_moments

IDS = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(0))


def test_every_source_becomes_calibration_data(smol_tokenizer):
    x, y = torch.randn(10, 1, 28, 28), torch.randint(0, 10, (10,))
    cases = {
        "tokens": as_calibration(IDS, 4),
        "pairs": as_calibration((x, y), 4),
        "inputs": as_calibration(x, 4),
        "dicts": as_calibration([{"input_ids": IDS[:2], "labels": IDS[:2]}, {"input_ids": IDS[2:], "labels": IDS[2:]}]),
    }
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=3)
    cases["loader"] = as_calibration(loader)
    cases["text"] = as_calibration(str(ASSETS / "stdlib_docstrings.calib.txt"), 2, tokenizer=smol_tokenizer,
                                   nsamples=4, seqlen=32)
    assert [len(cases[k]) for k in cases] == [2, 3, 3, 2, 4, 2]
    assert [cases[k].kind for k in cases] == ["tokens", "pairs", "inputs", "dicts", "pairs", "tokens"]
    assert cases["text"].ids.shape == (4, 32) and cases["loader"].samples == 10
    lm, cnn = tiny_model("llama"), ZOO["smallcnn"]().eval()
    for kind, model in (("tokens", lm), ("dicts", lm), ("pairs", cnn), ("loader", cnn), ("text", None)):
        if model is None:
            continue
        loss = cases[kind].loss(model, cases[kind].batches[0])
        assert loss.dim() == 0 and torch.isfinite(loss), kind
    # the LM loss equals the model's own shifted cross-entropy
    ref = lm(input_ids=IDS[:4], labels=IDS[:4]).loss
    torch.testing.assert_close(cases["tokens"].loss(lm, cases["tokens"].batches[0]), ref)


def test_bad_calibration_data_is_named():
    with pytest.raises(DataError, match="integer tensor of shape"):
        CalibrationData.from_ids(torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(DataError, match="mix kinds"):
        as_calibration([{"input_ids": IDS}, (torch.randn(2, 3), torch.zeros(2))])
    with pytest.raises(DataError, match="needs a tokenizer"):
        as_calibration("default")
    with pytest.raises(DataError, match="empty"):
        as_calibration([])
    with pytest.raises(DataError, match="not understood"):
        as_calibration(3.0)
    from prunekit.errors import ConfigError

    with pytest.raises(ConfigError, match="has no loss"):
        as_calibration(torch.randn(4, 3)).loss(nn.Linear(3, 2), Batch((torch.randn(4, 3),)))


def test_variance_survives_a_large_mean():
    """Regression: E[x^2] - E[x]^2 in float32 gave a variance of ~2 for mean 3000, std 1."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(40_000, 4, generator=g, dtype=torch.float64)
    x = (3000 + (z - z.mean(0)) / z.std(0)).float()  # float32 inputs, sample variance 1
    stats = InputStats(4, moments=True)
    for chunk in x.split(1000):
        stats.add(chunk)
    assert torch.allclose(stats.variance, torch.ones(4, dtype=torch.float64), atol=1e-3)
    torch.testing.assert_close(stats.variance, x.double().var(0), rtol=0, atol=1e-5)
    torch.testing.assert_close(stats.mean, x.double().mean(0), rtol=0, atol=1e-4)
    # the naive float32 formula really is this wrong (so this test can fail)
    naive = ((x * x).sum(0) - x.sum(0) ** 2 / x.shape[0]) / (x.shape[0] - 1)
    assert (naive - 1).abs().max() > 0.5
    # merged accumulators agree with one accumulator
    a, b = InputStats(4, moments=True), InputStats(4, moments=True)
    a.add(x[:15_000]), b.add(x[15_000:])
    a.merge(b)
    torch.testing.assert_close(a.variance, stats.variance, rtol=0, atol=1e-5)


def _naive_moments(model: nn.Module, data: CalibrationData) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Mean and variance of every Linear input from one whole-model forward with hooks."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: seen.setdefault(f"{n}.weight", []).append(
        a[0].detach().reshape(-1, a[0].shape[-1]).double())) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for batch in data:
            data.forward(model, batch)
    for h in hooks:
        h.remove()
    return {k: (torch.cat(v).mean(0), torch.cat(v).var(0)) for k, v in seen.items()}


def test_structural_moments_come_block_by_block_and_match_a_whole_model_pass():
    model = tiny_model("llama")
    data = CalibrationData.from_ids(IDS, 2)
    naive = _naive_moments(model, data)
    calls = {"block": 0, "head": 0}
    hooks = [model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: calls.update(block=calls["block"] + 1)),
             model.lm_head.register_forward_pre_hook(lambda m, a: calls.update(head=calls["head"] + 1))]
    stats = input_moments(model, data)
    for h in hooks:
        h.remove()
    # each block computed once per batch; the head once per batch, from the replayed last block output
    assert calls == {"block": len(data), "head": len(data)}
    assert set(stats) == set(naive)  # lm_head (outside the blocks) included
    for name, (mean, var) in naive.items():
        torch.testing.assert_close(stats[name].mean, mean, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(stats[name].variance, var, rtol=1e-4, atol=1e-6, msg=name)


def test_one_default_score_for_api_and_cli():
    assert default_method("neurons", tiny_model("llama")) == "flap"
    assert default_method("channels", ZOO["resnet"]()) == "l2"
    assert default_method("layers", tiny_model("llama")) == "block_influence"
    r = prune_structure(tiny_model("llama"), StructureConfig("neurons", 0.25), data=IDS)
    assert r.config.method == "flap" and r.report["method"] == "flap"


def test_flap_through_the_runner_equals_flap_on_naive_moments():
    """The FLAP choice made from block-by-block statistics equals the one from naive moments."""
    from prunekit.structural.scores import GROUP_SCORES, ScoreContext
    from prunekit.structural import build_graph

    model = tiny_model("qwen2")
    data = CalibrationData.from_ids(IDS, 3)
    graph = build_graph(model, data.trace_inputs(model))
    ctx = ScoreContext(copy.deepcopy(model), moments=input_moments(model, data))
    naive = ScoreContext(model, moments={})
    for name, (mean, var) in _naive_moments(model, data).items():
        s = InputStats(mean.numel(), moments=True)
        s.tokens, s.mean, s.m2 = IDS.numel(), mean, var * (IDS.numel() - 1)
        naive.moments[name] = s
    for g in graph.of_kind("neurons"):
        a, b = GROUP_SCORES.get("flap")(g.units, ctx), GROUP_SCORES.get("flap")(g.units, naive)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

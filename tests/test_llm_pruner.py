"""LLM-Pruner's group importance (Ma et al. 2023): the element-wise first + second order
Taylor term, against a hand computation from explicit per-sample gradients; pruning with it
removes the units it ranks lowest and the result runs and reloads."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from prunekit.calibration.data import CalibrationData
from prunekit.calibration.gradients import gradient_moments, loss_gradients
from prunekit.structural import GROUP_SCORES, StructureConfig, build_graph, prune_structure
from prunekit.structural.scores import ScoreContext

DATA = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))


def test_gradient_moments_are_the_sum_and_the_per_sample_squares():
    model = tiny_model("llama")
    w = model.model.layers[1].mlp.down_proj.weight
    total, squares = gradient_moments(model, CalibrationData.from_ids(DATA), {"w": w})
    singles = [loss_gradients(model, CalibrationData.from_ids(DATA[i : i + 1]), {"w": w})["w"] for i in range(4)]
    torch.testing.assert_close(total["w"], sum(singles))
    torch.testing.assert_close(squares["w"], sum(g.square() for g in singles))


def test_llm_pruner_score_by_hand():
    """For each MLP neuron: sum over gate/up rows and the down column of |g w - F w^2 / 2|."""
    model = tiny_model("llama")
    graph = build_graph(model, {"input_ids": DATA[:1], "use_cache": False})
    group = graph.of_kind("neurons")[0]
    total, squares = gradient_moments(model, CalibrationData.from_ids(DATA))
    ctx = ScoreContext(model, grads=total, fisher=squares)
    got = GROUP_SCORES.get("llm_pruner")(group.units, ctx)
    mlp = model.model.layers[0].mlp
    want = torch.zeros(mlp.up_proj.out_features)
    for proj, dim in ((mlp.gate_proj, 0), (mlp.up_proj, 0), (mlp.down_proj, 1)):
        name = next(n for n, p in model.named_parameters() if p is proj.weight)
        w, g, f = proj.weight.detach(), total[name], squares[name]
        element = (g * w - 0.5 * f * w * w).abs()
        want += element.sum(1 - dim)
    torch.testing.assert_close(got, want)


def test_llm_pruner_prunes_the_lowest_units_and_runs():
    model = tiny_model("llama")
    graph = build_graph(model, {"input_ids": DATA[:1], "use_cache": False})
    total, squares = gradient_moments(model, CalibrationData.from_ids(DATA))
    score = GROUP_SCORES.get("llm_pruner")(graph.of_kind("neurons")[0].units, ScoreContext(model, total, squares))
    keep = torch.sort(torch.topk(score, score.numel() - score.numel() // 4).indices).values
    up = model.model.layers[0].mlp.up_proj.weight.detach()[keep].clone()
    result = prune_structure(model, StructureConfig("neurons", 0.25, "llm_pruner", batch_size=4), data=DATA)
    assert model.model.layers[0].mlp.up_proj.weight.shape[0] == keep.numel()
    torch.testing.assert_close(model.model.layers[0].mlp.up_proj.weight, up)
    assert result.report["params_after"] < result.report["params_before"]
    with torch.no_grad():
        assert torch.isfinite(model(DATA).logits).all()


def test_llm_pruner_needs_data():
    from prunekit.errors import ConfigError

    with pytest.raises(ConfigError, match="needs calibration data"):
        prune_structure(tiny_model("llama"), StructureConfig("neurons", 0.25, "llm_pruner"),
                        example_inputs={"input_ids": DATA[:1]})


def test_block_range_keeps_blocks_outside_it_whole():
    model = tiny_model("llama")
    width = model.model.layers[0].mlp.up_proj.out_features
    cfg = StructureConfig("neurons", 0.25, "llm_pruner", batch_size=4, blocks=(1, 2))
    prune_structure(model, cfg, data=DATA)
    assert model.model.layers[0].mlp.up_proj.out_features == width
    assert model.model.layers[1].mlp.up_proj.out_features == width - round(0.25 * width)
    assert StructureConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("kw,match", [
    ({"structure": "neurons", "blocks": (3, 1)}, "0 <= start < stop"),
    ({"structure": "width", "blocks": (0, 1)}, "goes with --structure neurons or heads"),
    ({"structure": "neurons", "blocks": (0, 1), "allocation": "global"}, "uniform allocation"),
])
def test_block_range_errors(kw, match):
    from prunekit.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        StructureConfig(ratio=0.25, **kw)


def test_cli_blocks_flag(capsys, tiny_llama_dir, tmp_path):
    from conftest import run_cli

    code, _, err = run_cli(capsys, "prune", tiny_llama_dir, "--structure", "neurons", "--ratio", "0.25",
                           "--blocks", "1-2", "--output", tmp_path / "o")
    assert code == 2 and "START:STOP" in err and not (tmp_path / "o").exists()
    code, _, err = run_cli(capsys, "prune", tiny_llama_dir, "--blocks", "1:2", "--output", tmp_path / "o")
    assert code == 2 and "--blocks goes with --structure" in err
    code, out, err = run_cli(capsys, "prune", tiny_llama_dir, "--structure", "neurons", "--ratio", "0.25",
                             "--method", "llm_pruner", "--blocks", "1:2", "--nsamples", "2", "--seqlen", "16",
                             "--output", tmp_path / "p", "--json")
    assert code == 0, err

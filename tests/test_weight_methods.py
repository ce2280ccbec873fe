"""RIA, GBLM and DSnoT: each against a hand computation, its exact invariants (sparsity,
N:M, DSnoT at zero cycles), composition with the other axes, and its errors."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import run_cli, tiny_model
from prunekit import Calibration, PruneConfig, prune
from prunekit.calibration.data import CalibrationData
from prunekit.calibration.gradients import loss_gradients
from prunekit.calibration.stats import InputStats
from prunekit.errors import ConfigError, ScheduleError
from prunekit.patterns import MaskSpec, is_nm
from prunekit.refine import REFINEMENTS, RefineProblem
from prunekit.refine.dsnot import DSnoTParams, expected_error
from prunekit.scoring import SCORES, LayerStats


def test_ria_by_hand():
    w = torch.tensor([[1.0, -2.0, 0.0], [3.0, 1.0, -1.0]])  # (out 2, in 3)
    norm = torch.tensor([4.0, 1.0, 9.0])
    got = SCORES.get("ria")(w, LayerStats(input_norm=norm))
    row, col = [3.0, 5.0], [4.0, 3.0, 1.0]
    want = torch.tensor([[abs(w[i, j].item()) / row[i] + abs(w[i, j].item()) / col[j] for j in range(3)]
                         for i in range(2)]) * norm.sqrt()
    torch.testing.assert_close(got, want)
    assert SCORES.get("ria").allocation_proxy == "wanda" and SCORES.get("ria").default_group == "row"


def test_gblm_by_hand():
    w, norm = torch.tensor([[1.0, -2.0]]), torch.tensor([3.0, 0.5])
    g = torch.tensor([[0.01, 0.02]])
    got = SCORES.get("gblm")(w, LayerStats(input_norm=norm, grad=g))
    torch.testing.assert_close(got, torch.tensor([[1.0 * (3.0 + 1.0), 2.0 * (0.5 + 2.0)]]))


def test_per_sample_gradient_norm_matches_explicit_samples():
    """``sqrt(sum_n g_n^2)`` over single windows, computed by one backward per window here."""
    model = tiny_model("llama", vocab=64)
    ids = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(0))
    data = CalibrationData.from_ids(ids)  # one batch of 3 windows
    params = {"w": model.model.layers[0].mlp.up_proj.weight}
    got = loss_gradients(model, data, params, per_sample_l2=True)["w"]
    squares = torch.zeros_like(params["w"])
    for i in range(3):
        g = loss_gradients(model, CalibrationData.from_ids(ids[i : i + 1]), params)["w"]
        squares += g.square()
    torch.testing.assert_close(got, squares.sqrt())
    summed = loss_gradients(model, data, params)["w"]  # the batch's gradient is not that norm
    assert not torch.allclose(summed.abs(), got)


def _problem(spec: MaskSpec, cycles: int = 50, seed: int = 0) -> RefineProblem:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 32, generator=g) + torch.linspace(-1, 2, 32)  # (tokens, in): features with means
    stats = InputStats(32, moments=True)
    stats.add(x)
    dense = torch.randn(24, 32, generator=g)  # (out, in)
    pruned = spec.mask(SCORES.get("wanda")(dense, LayerStats(input_norm=stats.input_norm)))
    return RefineProblem(dense, dense.masked_fill(pruned, 0.0), pruned, stats.mean.float(), stats.variance.float(),
                         stats.input_norm, spec, DSnoTParams(cycles=cycles))


@pytest.mark.parametrize("spec", [MaskSpec("unstructured", 0.5, "row"), MaskSpec("nm", n=2, m=4)], ids=str)
def test_dsnot_keeps_counts_and_pattern_and_lowers_every_rows_error(spec):
    problem = _problem(spec)
    weight, pruned = REFINEMENTS.get("dsnot")(problem)
    assert torch.equal(pruned.sum(1), problem.pruned.sum(1))  # the same count in every row
    if spec.kind == "nm":
        assert is_nm(weight, 2, 4)
    assert (weight[pruned] == 0).all() and torch.equal(weight[~pruned], problem.dense[~pruned])
    before = expected_error(problem.dense, problem.weight, problem.mean).abs()
    after = expected_error(problem.dense, weight, problem.mean).abs()
    assert (after <= before + 1e-6).all() and after.sum() < (0.5 if spec.kind == "unstructured" else 0.8) * before.sum()
    assert not torch.equal(pruned, problem.pruned)


def test_dsnot_with_zero_cycles_is_its_initial_mask():
    problem = _problem(MaskSpec("unstructured", 0.5, "row"), cycles=0)
    weight, pruned = REFINEMENTS.get("dsnot")(problem)
    assert torch.equal(pruned, problem.pruned) and torch.equal(weight, problem.weight)


def test_dsnot_keeps_reconstructed_values_and_regrows_dense_ones():
    """On top of a reconstruction (weights that are not the dense ones) survivors keep their
    reconstructed value; a weight pruned at first comes back at its dense value."""
    problem = _problem(MaskSpec("unstructured", 0.5, "row"))
    shifted = problem.weight + 0.01 * (~problem.pruned)
    weight, pruned = REFINEMENTS.get("dsnot")(RefineProblem(**{**problem.__dict__, "weight": shifted}))
    stayed, grown = ~pruned & ~problem.pruned, ~pruned & problem.pruned
    assert grown.any()
    torch.testing.assert_close(weight[stayed], shifted[stayed])
    torch.testing.assert_close(weight[grown], problem.dense[grown])


def test_dsnot_swaps_by_hand():
    """One row, error 4 from the pruned weights 0, 1 and 5 (unit means). Cycle 1 grows 1 (its
    1/var of 1 beats 2/4 and 1/4) and prunes 3 (of the two kept weights that lower the error,
    the one of least Wanda importance: 0.4*1 < 0.5*2): error 2.6. Cycle 2 grows 0 and prunes 2:
    error 0.1, below 0.1 of the start, so the row stops."""
    dense = torch.tensor([[2.0, 1.0, -0.5, -0.4, 3.0, 1.0]])  # (1, 6)
    pruned = torch.tensor([[True, True, False, False, False, True]])
    problem = RefineProblem(dense, dense.masked_fill(pruned, 0.0), pruned, torch.ones(6),
                            torch.tensor([4.0, 1, 1, 1, 1, 4]), torch.tensor([1.0, 1, 2, 1, 1, 1]),
                            MaskSpec("unstructured", 0.5, "row"), DSnoTParams(cycles=50, threshold=0.1))
    weight, after = REFINEMENTS.get("dsnot")(problem)
    assert after.tolist() == [[False, False, True, True, False, True]]
    torch.testing.assert_close(weight, dense.masked_fill(after, 0.0))
    torch.testing.assert_close(expected_error(dense, weight, torch.ones(6)), torch.tensor([0.1]))


@pytest.mark.parametrize("method,pattern,refine,allocation", [
    ("ria", "unstructured", "none", "uniform"),
    ("gblm", "unstructured", "none", "owl"),
    ("ria", "2:4", "none", "uniform"),
    ("wanda", "unstructured", "dsnot", "uniform"),
    ("sparsegpt", "2:4", "dsnot", "uniform"),
    ("gblm", "2:4", "dsnot", "uniform"),
])
def test_methods_compose_with_patterns_allocations_and_refinement(method, pattern, refine, allocation):
    model = tiny_model("llama", vocab=64)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    cfg = PruneConfig.from_method(method, pattern=pattern, calibration=Calibration(4, 16), refine=refine,
                                  allocation=__import__("prunekit").Allocation(allocation))
    result = prune(model, cfg, ids, progress=False)
    assert result.report["sparsity"] == pytest.approx(0.5, abs=0.02 if allocation == "owl" else 1e-6)
    for layer in model.model.layers:
        w = layer.mlp.down_proj.weight
        if pattern == "2:4":
            assert is_nm(w, 2, 4)
        elif allocation == "uniform":
            assert ((w == 0).sum(1) == w.shape[1] // 2).all()


def test_dsnot_improves_the_layer_error_on_a_real_llama_block(calib_text, smol_tokenizer):
    """The expected error DSnoT drives down falls on real inputs of a pruned real-tokenizer
    model: the mean output error of every down projection against its dense self."""
    from conftest import ids_for

    model = tiny_model("llama", vocab=len(smol_tokenizer), seed=3)
    ids = ids_for(smol_tokenizer, calib_text, 8, 32)
    errors = {}
    for refine in ("none", "dsnot"):
        pruned = copy.deepcopy(model)
        inputs: dict[int, torch.Tensor] = {}
        def keep(i):
            def hook(module, args):
                inputs[i] = args[0].detach().reshape(-1, args[0].shape[-1])  # (tokens, in)
            return hook

        hooks = [layer.mlp.down_proj.register_forward_pre_hook(keep(i)) for i, layer in enumerate(model.model.layers)]
        with torch.no_grad():
            model(ids)
        for h in hooks:
            h.remove()
        prune(pruned, PruneConfig.from_method("wanda", calibration=Calibration(8, 32), refine=refine), ids,
              progress=False)
        with torch.no_grad():
            errors[refine] = sum(float(((layer.mlp.down_proj.weight - p.mlp.down_proj.weight) @ inputs[i].mean(0))
                                       .abs().sum()) for i, (layer, p) in enumerate(zip(model.model.layers,
                                                                                        pruned.model.layers)))
    assert errors["dsnot"] < errors["none"]


def test_recipe_round_trip_with_refinement():
    from prunekit.recipe import Recipe

    text = """
calibration: {nsamples: 4, seqlen: 16}
stages:
  - weights: {method: sparsegpt, pattern: "2:4", refine: dsnot, refine_params: {cycles: 7, threshold: 0.2}}
"""
    recipe = Recipe.from_yaml(text)
    stage = recipe.stages[0]
    assert stage.refine == "dsnot" and stage.refine_params == DSnoTParams(cycles=7, threshold=0.2)
    assert Recipe.from_yaml(recipe.to_yaml()).stages[0] == stage
    with pytest.raises(ConfigError, match="refinement 'none' takes no parameters"):
        Recipe.from_yaml(text.replace("refine: dsnot, ", ""))
    with pytest.raises(ConfigError, match="unknown refinement 'dsnott'"):
        Recipe.from_yaml(text.replace("refine: dsnot", "refine: dsnott"))


@pytest.mark.parametrize("kw,match", [
    ({"cycles": -1}, "cycles must be an integer >= 0"),
    ({"threshold": 1.5}, r"threshold must be in \[0, 1\)"),
])
def test_dsnot_parameter_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        DSnoTParams(**kw)


def test_gblm_refused_by_training_schedules():
    from prunekit.schedules.base import check_training_score

    with pytest.raises(ScheduleError, match="per-sample gradient norms"):
        check_training_score("gblm")


def test_cli_refine_flag(capsys, tiny_llama_dir, tmp_path):
    code, _, err = run_cli(capsys, "prune", tiny_llama_dir, "--structure", "neurons", "--ratio", "0.25",
                           "--refine", "dsnot", "--output", tmp_path / "o")
    assert code == 2 and "--refine is for weight pruning" in err and not (tmp_path / "o").exists()
    code, out, err = run_cli(capsys, "prune", tiny_llama_dir, "--method", "ria", "--pattern", "2:4", "--refine",
                             "dsnot", "--nsamples", "2", "--seqlen", "16", "--output", tmp_path / "p", "--json")
    assert code == 0, err
    assert "refine: dsnot" in (tmp_path / "p" / "prunekit_recipe.yaml").read_text()

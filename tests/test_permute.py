"""Channel permutation for N:M: the search against hand cases and its never-worse guarantee,
then the whole path: masks N:M over the saved input order, weights left in the model's own
order, the order saved and reloaded, and the errors."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import run_cli, tiny_model
from prunekit import Calibration, PruneConfig, load, prune
from prunekit.errors import ConfigError
from prunekit.evaluate import sparsity_report
from prunekit.patterns import is_nm
from prunekit.patterns.permute import (PERMS_ATTR, PERMUTATIONS_FILE, channel_permutation, input_permutations,
                                       is_nm_permuted, kept_score)


def test_dealing_finds_the_best_groups_by_hand():
    scores = torch.tensor([[9.0, 8.0, 7.0, 6.0, 1.0, 1.0, 1.0, 1.0]])  # (1, 8): the layout groups the 4 best
    assert float(kept_score(scores, 2, 4)) == 9 + 8 + 1 + 1
    perm = channel_permutation(scores, 2, 4)
    assert sorted(perm.tolist()) == list(range(8))
    assert float(kept_score(scores[:, perm], 2, 4)) == 9 + 8 + 7 + 6  # the best any grouping keeps


def test_no_gain_gives_the_identity():
    scores = torch.ones(4, 16)
    assert torch.equal(channel_permutation(scores, 2, 4), torch.arange(16))


@pytest.mark.parametrize("n,m,seed", [(2, 4, 0), (1, 4, 1), (4, 8, 2)])
def test_permutation_never_keeps_less_and_swaps_help(n, m, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(24, 64, generator=g).abs() * torch.randn(64, generator=g).abs().exp()  # heavy columns
    base = float(kept_score(scores, n, m))
    dealt = channel_permutation(scores, n, m, rounds=0, generator=torch.Generator().manual_seed(0))
    swapped = channel_permutation(scores, n, m, rounds=16, generator=torch.Generator().manual_seed(0))
    for perm in (dealt, swapped):
        assert sorted(perm.tolist()) == list(range(64))
    assert float(kept_score(scores[:, dealt], n, m)) > base
    assert float(kept_score(scores[:, swapped], n, m)) >= float(kept_score(scores[:, dealt], n, m))


def _wanda_kept(model, ids, names):
    """Wanda score |W| * ||x|| kept by the named layers of block 0 (dense inputs there)."""
    inputs = {}
    hook = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda mod, args: inputs.__setitem__("x", args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(ids)
    hook.remove()
    norm = inputs["x"].float().norm(dim=0)  # (in,)
    attn = model.model.layers[0].self_attn
    return sum(float((getattr(attn, n).weight.detach().abs() * norm).sum()) for n in names)


def test_wanda_2of4_permuted_keeps_more_score_and_the_model_order():
    model = tiny_model("llama", vocab=64, seed=2)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    dense = copy.deepcopy(model)
    plain, permuted = copy.deepcopy(model), copy.deepcopy(model)
    cfg = PruneConfig.from_method("wanda", pattern="2:4", calibration=Calibration(4, 16))
    prune(plain, cfg, ids, progress=False)
    result = prune(permuted, PruneConfig.from_method("wanda", pattern="2:4", calibration=Calibration(4, 16),
                                                     permute=True), ids, progress=False)
    perms = input_permutations(permuted)
    report = result.report
    assert report["nm_valid"] and report["input_permuted_layers"] == len(perms) > 0
    assert "x[..., perm]" in report["input_permuted_note"]
    for (name, p), (_, d) in zip(permuted.named_parameters(), dense.named_parameters()):
        if p.dim() == 2 and name.startswith("model.layers."):
            layer = name.removesuffix(".weight")
            assert ((p == 0).float().mean() == 0.5), name
            assert is_nm_permuted(p, 2, 4, perms.get(layer)), name
            assert torch.equal(p[p != 0], d[p != 0]), name  # kept weights at their own places, unchanged
    assert any(not is_nm(dict(permuted.named_parameters())[n + ".weight"], 2, 4) for n in perms)
    qkv = ("q_proj", "k_proj", "v_proj")
    assert _wanda_kept(permuted, ids, qkv) > _wanda_kept(plain, ids, qkv)


@pytest.mark.parametrize("method,refine", [("sparsegpt", "none"), ("sparsegpt", "dsnot"), ("magnitude", "none"),
                                           ("ria", "dsnot")])
def test_permute_composes_with_reconstruction_and_refinement(method, refine):
    model = tiny_model("llama", vocab=64, seed=4)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(2))
    result = prune(model, PruneConfig.from_method(method, pattern="2:4", calibration=Calibration(4, 16),
                                                  refine=refine, permute=True), ids, progress=False)
    perms = input_permutations(model)
    assert result.report["nm_valid"] and perms
    for name, module in model.named_modules():
        if name in perms:
            assert is_nm_permuted(module.weight, 2, 4, perms[name]) and (module.weight == 0).float().mean() == 0.5
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_pruning_again_without_permute_forgets_the_order():
    model = tiny_model("llama", vocab=64, seed=5)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(3))
    prune(model, PruneConfig.from_method("wanda", pattern="2:4", calibration=Calibration(4, 16), permute=True), ids,
          progress=False)
    assert input_permutations(model)
    result = prune(model, PruneConfig.from_method("magnitude", pattern="2:4"), progress=False)
    assert not input_permutations(model) and result.report["nm_valid"] and "input_permuted_layers" not in result.report


def test_cli_permute_saves_reloads_and_reports(capsys, tiny_llama_dir, tmp_path):
    out = tmp_path / "p"
    code, _, err = run_cli(capsys, "prune", tiny_llama_dir, "--method", "wanda", "--pattern", "2:4", "--permute",
                           "--nsamples", "2", "--seqlen", "16", "--output", out, "--json")
    assert code == 0, err
    assert "permute: true" in (out / "prunekit_recipe.yaml").read_text()
    assert (out / PERMUTATIONS_FILE).is_file()
    model, _ = load(str(out))
    perms = input_permutations(model)
    assert perms and sparsity_report(model, nm=(2, 4))["nm_valid"]
    del model.__dict__[PERMS_ATTR]  # the saved orders are what make the layers N:M
    assert not sparsity_report(model, nm=(2, 4))["nm_valid"]


def test_permute_errors(capsys, tiny_llama_dir, tmp_path):
    with pytest.raises(ConfigError, match="use --pattern 2:4"):
        PruneConfig.from_method("wanda", permute=True)
    with pytest.raises(ConfigError, match="permute takes true or false"):
        PruneConfig.from_method("wanda", pattern="2:4", permute=1)
    code, _, err = run_cli(capsys, "prune", tiny_llama_dir, "--permute", "--output", tmp_path / "o")
    assert code == 2 and "pattern unstructured has no groups" in err and not (tmp_path / "o").exists()
    code, _, err = run_cli(capsys, "prune", tiny_llama_dir, "--structure", "neurons", "--ratio", "0.25",
                           "--permute", "--output", tmp_path / "o")
    assert code == 2 and "--permute is for weight pruning" in err and not (tmp_path / "o").exists()


def test_recipe_round_trip_with_permute():
    from prunekit.recipe import Recipe

    text = 'calibration: {nsamples: 4, seqlen: 16}\nstages:\n  - weights: {method: wanda, pattern: "2:4", permute: true}\n'
    stage = Recipe.from_yaml(text).stages[0]
    assert stage.permute is True
    assert Recipe.from_yaml(Recipe.from_yaml(text).to_yaml()).stages[0] == stage
    with pytest.raises(ConfigError, match="permute"):
        Recipe.from_yaml(text.replace('"2:4"', "unstructured"))

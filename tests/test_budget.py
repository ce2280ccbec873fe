"""Budget-driven structural pruning: the cost arithmetic by hand, the search on a real (tiny)
Llama, the replayable result, the CLI contract and its errors."""
from __future__ import annotations

import copy

import pytest
import torch

from prunekit.allocation.budget import Cost, affine, estimate, fill, levels, mixes, solve
from prunekit.errors import ConfigError
from prunekit.structural.budget import BudgetStage, search

from conftest import ASSETS, last_json, run_cli


def byte_windows(n: int, seqlen: int, offset: int = 0) -> torch.Tensor:
    """Real text as byte tokens (vocabulary 256): ``n`` consecutive windows."""
    data = (ASSETS / "stdlib_docstrings.calib.txt").read_bytes()[offset:offset + n * seqlen]
    return torch.tensor(list(data), dtype=torch.long).view(n, seqlen)


def llama(layers: int = 4, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# -- arithmetic ---------------------------------------------------------------------------
def test_levels_keep_multiples_and_one_unit():
    assert levels(6) == (0, 1, 2, 3, 4, 5)
    assert levels(128, 32) == (0, 32, 64, 96)  # 96, 64 or 32 neurons stay
    assert levels(3) == (0, 1, 2)
    assert levels(1) == (0,)


def test_affine_and_estimate_by_hand():
    assert affine(1, 110.0, 4, 410.0) == (10.0, 100.0)  # 10 once + 100 per unit
    costs = {"layers": Cost("layers", 4, (0, 1, 2, 3), (0.0, 1000.0), (0.0, 0.0)),
             "neurons": Cost("neurons", 8, (0, 2, 4, 6), (10.0, 100.0), (0.0, 0.0))}
    # 1 of 4 blocks (1000) and 4 neurons in each of the 3 remaining blocks: 3/4 of (10 + 400)
    assert estimate(costs, {"layers": 1, "neurons": 4}, 10_000, "params") == 10_000 - 1000 - 0.75 * 410
    assert estimate(costs, {"layers": 0, "neurons": 0}, 10_000, "params") == 10_000


def test_solve_is_the_least_removal_then_filled():
    costs = {"layers": Cost("layers", 4, (0, 1, 2, 3), (0.0, 1000.0), (0.0, 0.0)),
             "neurons": Cost("neurons", 8, (0, 2, 4, 6), (10.0, 100.0), (0.0, 0.0))}
    only_neurons = solve(costs, {"layers": 0.0, "neurons": 1.0}, 10_000, 9_500, "params")
    assert only_neurons == {"layers": 0, "neurons": 6}  # 4 neurons remove 410 < 500; 6 remove 610
    assert solve(costs, {"layers": 0.0, "neurons": 1.0}, 10_000, 9_000, "params") is None  # 610 at most
    both = solve(costs, {"layers": 1.0, "neurons": 1.0}, 10_000, 8_500, "params")
    assert estimate(costs, both, 10_000, "params") <= 8_500
    # filled: no single step back of any structure still fits
    for s, c in costs.items():
        i = c.levels.index(both[s])
        if i:
            assert estimate(costs, {**both, s: c.levels[i - 1]}, 10_000, "params") > 8_500
    # from the deepest point (6847.5) fill gives back the finest steps first: neurons 6 -> 4 -> 2 -> 0
    # (7000), then a block (3 -> 2: 8000); one block more would be 9000 > 8500
    assert fill(costs, {"layers": 3, "neurons": 6}, 10_000, 8_500, "params") == {"layers": 2, "neurons": 0}


def test_mixes_start_with_everything_then_each_alone():
    m = mixes(("layers", "heads", "neurons"), 7)
    assert m[0] == {"layers": 1.0, "heads": 1.0, "neurons": 1.0}
    assert [tuple(x.values()) for x in m[1:4]] == [(0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (1.0, 0.0, 0.0)]
    assert [sorted(x.values()) for x in m[4:7]] == [[0.0, 1.0, 1.0]] * 3  # then each pair
    assert len(mixes(("layers", "heads", "neurons"), 100)) == 19  # {0, .5, 1}^3 with a 1 somewhere
    assert all(max(w.values()) == 1.0 for w in m)


def test_stage_validation_names_the_fix():
    with pytest.raises(ConfigError, match="exactly one of target_params"):
        BudgetStage()
    with pytest.raises(ConfigError, match="exactly one"):
        BudgetStage(target_params=10, target_macs=10)
    with pytest.raises(ConfigError, match="must be some of"):
        BudgetStage(structures=("neurons", "experts"), target_params=10)
    with pytest.raises(ConfigError, match="positive"):
        BudgetStage(target_params=-5)
    with pytest.raises(ConfigError, match="round_to"):
        BudgetStage(target_params=10, round_to=0)
    assert BudgetStage(structures="neurons,layers", target_params=10).structures == ("layers", "neurons")


# -- the search on a real model -------------------------------------------------------------
def _data(n: int = 8, seqlen: int = 32):
    from prunekit.calibration import CalibrationData

    return CalibrationData.from_ids(byte_windows(n, seqlen), batch_size=2)


def test_search_meets_the_budget_with_the_best_candidate_and_replays_exactly():
    from prunekit.recipe import CalibrationSpec, Recipe
    from prunekit.structural.budget import held_loss, _split

    model = llama()
    dense = copy.deepcopy(model)
    target = params(model) - 60_000
    stage = BudgetStage(target_params=target, round_to=8, candidates=6, search_samples=4, eval_samples=4)
    data = _data()
    report = search(stage, model, data, progress=False)
    assert params(model) == report["params_after"] <= target
    assert report["params_before"] == params(dense)
    rows = report["candidates"]
    assert len(rows) >= 2 and sum(r["chosen"] for r in rows) == 1
    best = next(r for r in rows if r["chosen"])
    assert best["loss"] == min(r["loss"] for r in rows)
    assert all(r["params"] <= target for r in rows)  # every candidate meets the budget exactly
    for r in rows:  # widths keep a multiple of round_to
        assert (128 - r["neurons"]) % 8 == 0
    # the report's resolved structure stages replay the same model, weight for weight
    replay = copy.deepcopy(dense)
    from prunekit.pipeline import run

    recipe = Recipe.from_dict({"calibration": {"nsamples": 8, "seqlen": 32, "batch_size": 2},
                               "stages": report["resolved"]})
    run(recipe, replay, data=data, progress=False)
    a, b = model.state_dict(), replay.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the chosen candidate's held-out loss is the loss of a model pruned on the search slice
    search_part, held = _split(data, 4, 4)
    again = copy.deepcopy(dense)
    recipe = Recipe(Recipe.from_dict({"stages": report["resolved"]}).stages, CalibrationSpec(nsamples=4, seqlen=32))
    run(recipe, again, data=search_part, progress=False)
    assert held_loss(again, held) == pytest.approx(best["loss"], rel=1e-6)


def test_search_on_macs_and_unreachable_budgets():
    model = llama()
    data = _data()
    from prunekit.evaluate.macs import count_macs

    macs0 = count_macs(model, data.trace_inputs(model))
    report = search(BudgetStage(target_macs=int(macs0 * 0.7), round_to=8, candidates=3, search_samples=4,
                                eval_samples=4), model, data, progress=False)
    assert report["macs_after"] <= macs0 * 0.7 and report["metric"] == "macs"
    fresh = llama()
    with pytest.raises(ConfigError, match=r"below the smallest size --structure layers,heads,neurons can reach: "
                                          r"[\d,]+ params"):
        search(BudgetStage(target_params=1000, round_to=8), fresh, data, progress=False)
    with pytest.raises(ConfigError, match="already within the target"):
        search(BudgetStage(target_params=params(fresh) + 1, round_to=8), fresh, data, progress=False)
    with pytest.raises(ConfigError, match="below the fastest reachable"):
        search(BudgetStage(target_latency_ms=1e-6, round_to=8), fresh, data, progress=False)
    assert params(fresh) == params(llama())  # errors leave the model whole


def test_fast_multiple_is_measured():
    from prunekit.evaluate.latency import MULTIPLES, fast_multiple

    m, timing = fast_multiple(512, 64, tokens=32)
    assert m in MULTIPLES
    assert set(timing) == {512, *(512 - k for k in MULTIPLES)} and all(v > 0 for v in timing.values())


# -- CLI contract -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smol_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("budget-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return path


def test_cli_prune_to_target_params(tiny_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    n0 = params(AutoModelForCausalLM.from_pretrained(tiny_dir))
    target = n0 - 50_000
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "prune", tiny_dir, "--structure", "neurons,heads,layers", "--target-params",
                                target, "--calib", "default", "--nsamples", 8, "--seqlen", 32, "--round-to", 8,
                                "--candidates", 3, "--output", out, "--json", "--quiet")
    assert code == 0, err
    res = last_json(stdout)
    assert res["params_after"] <= target and res["params_before"] == n0
    assert res["structures"] == ["layers", "heads", "neurons"] and res["candidates"]
    reloaded = AutoModelForCausalLM.from_pretrained(out)  # plain from_pretrained: uniform widths
    assert params(reloaded) == res.get("params_saved", res["params_after"])


@pytest.mark.parametrize("argv, message", [
    (["--structure", "neurons,heads"], "names several structures"),
    (["--structure", "neurons", "--target-params", "10", "--ratio", "0.2"], "--ratio does not go with --target"),
    (["--structure", "neurons", "--target-params", "10", "--target-macs", "10"], "give one budget"),
    (["--target-params", "10"], "--target-params goes with --structure"),
    (["--structure", "neurons", "--round-to", "auto", "--ratio", "0.2"], "--round-to auto goes with a --target"),
])
def test_cli_budget_flag_errors(tiny_dir, tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    code, _, err = run_cli(capsys, "prune", tiny_dir, *argv, "--output", out)
    assert code == 2 and message in err
    assert not out.exists()


def test_cli_target_below_reachable_names_the_smallest(tiny_dir, tmp_path, capsys):
    out = tmp_path / "never"
    code, _, err = run_cli(capsys, "prune", tiny_dir, "--structure", "neurons", "--target-params", 1000,
                           "--round-to", 8, "--nsamples", 4, "--seqlen", 32, "--output", out)
    assert code == 2 and "smallest size --structure neurons can reach" in err
    assert not out.exists()


def test_cli_dry_run_plans_a_budget(tiny_dir, capsys):
    from transformers import AutoModelForCausalLM

    n0 = params(AutoModelForCausalLM.from_pretrained(tiny_dir))
    code, stdout, err = run_cli(capsys, "prune", tiny_dir, "--structure", "neurons,layers", "--target-params",
                                n0 - 40_000, "--round-to", 8, "--dry-run", "--json", "--quiet")
    assert code == 0, err
    plan = last_json(stdout)
    assert plan["params_after"] <= n0 - 40_000 and plan["stages"][0]["kind"] == "budget"


@pytest.mark.slow
def test_smollm2_budget_then_distillation_recovers(tmp_path):
    """Real SmolLM2-135M to 115M parameters by the budget search, then 12 distillation steps:
    the budget is met exactly and distillation lowers held-out perplexity."""
    import prunekit
    from prunekit.recipe import Recipe

    dense = prunekit.load("default")
    recipe = Recipe.from_dict({"calibration": {"nsamples": 12, "seqlen": 128, "batch_size": 4},
                               "stages": [{"budget": {"target_params": 115_000_000, "candidates": 2,
                                                      "search_samples": 4, "eval_samples": 4}}]})
    pruned = prunekit.run(recipe, dense, progress=False)
    assert pruned.report["params_after"] == params(pruned.model) <= 115_000_000
    before = prunekit.evaluate_perplexity(pruned.model, dense.tokenizer, seqlen=128, max_tokens=2048,
                                          progress=False).perplexity
    distill = Recipe.from_dict({"calibration": {"nsamples": 12, "seqlen": 128, "batch_size": 4},
                                "stages": [{"recovery": {"method": "full", "steps": 12, "lr": 1e-4,
                                                         "distill": {"kl": 1.0, "teacher": "default"}}}]})
    recovered = prunekit.run(distill, pruned, progress=False)
    after = prunekit.evaluate_perplexity(recovered.model, dense.tokenizer, seqlen=128, max_tokens=2048,
                                         progress=False).perplexity
    print(f"115M budget: perplexity {before:.2f} -> {after:.2f} after 12 distillation steps")
    assert after < before

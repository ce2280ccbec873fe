"""Property tests: hundreds of generated recipes and ``prune`` flag combinations, valid and
invalid. Each one either runs on a tiny model or fails with one of prunekit's own errors
before it changes anything: never a crash from inside the model or a half-applied stage."""
from __future__ import annotations

import argparse
import copy

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tiny_model
from prunekit import Recipe, run
from prunekit.errors import PrunekitError

IDS = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
MODEL = tiny_model("qwen2")  # 64 hidden, 128 intermediate, 4 query / 2 KV heads, 2 blocks

anything = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.floats(-1, 2), st.just(float("nan")),
                     st.text(max_size=6), st.lists(st.integers(0, 3), max_size=2))


def rarely(good: st.SearchStrategy, bad: st.SearchStrategy, one_in: int = 6) -> st.SearchStrategy:
    """``bad`` about once in ``one_in`` draws, else ``good``."""
    return st.integers(0, one_in - 1).flatmap(lambda i: bad if i == 0 else good)


def mostly(valid: list, invalid: list) -> st.SearchStrategy:
    return rarely(st.sampled_from(valid), st.sampled_from(invalid))


ratio = st.one_of(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75]), st.sampled_from([0.25, 0.5]),
                  st.floats(-0.5, 1.5, allow_nan=False))
weights = st.fixed_dictionaries({}, optional={
    "method": mostly(["magnitude", "random", "wanda", "sparsegpt"], ["obd"]),
    "sparsity": ratio,
    "pattern": mostly(["unstructured", "unstructured:row", "unstructured:layer", "2:4", "4:8"], ["2:3", "4:2", "x"]),
    "allocation": st.one_of(mostly(["uniform", "global", "owl", "erk", "global_min"], ["bogus"]),
                            st.fixed_dictionaries({"name": st.just("owl")}, optional={"m": anything, "lambda": anything})),
    "ignore": mostly([[], ["o_proj"], "mlp"], [["("]]),
    "unreached": mostly(["magnitude", "dense"], ["skip"]),
    "sparsegpt": st.fixed_dictionaries({}, optional={"blocksize": mostly([8, 16], [12, 0]),
                                                     "damp": mostly([0.01, 0.1], [0.0, 1.5])}),
})
structure = st.fixed_dictionaries({"structure": mostly(["neurons", "heads", "channels", "layers"], ["experts", "x"]),
                                   "ratio": ratio}, optional={
    "method": mostly(["l2", "l1", "random", "wanda", "flap", "taylor", "block_influence"], ["frequency", "sparsegpt"]),
    "heads": mostly(["kv", "query"], ["all"]),
    "allocation": mostly(["uniform", "global"], ["owl"]),
    "round_to": mostly([1, 2, 8], [0]),
})
recovery = st.fixed_dictionaries({}, optional={"method": st.sampled_from(["bias_norm", "lora", "x"]),
                                                "steps": st.sampled_from([1, 2, 0]), "rank": st.sampled_from([1, 2])})
good_stage = st.one_of(st.fixed_dictionaries({"weights": weights}), st.fixed_dictionaries({"weights": weights}),
                       st.fixed_dictionaries({"structure": structure}), st.fixed_dictionaries({"structure": structure}),
                       st.fixed_dictionaries({"recovery": recovery}))
bad_stage = st.one_of(st.fixed_dictionaries({"prune": st.just({})}), anything,
                      st.fixed_dictionaries({"weights": st.fixed_dictionaries({"sparsty": anything})}))
stage = rarely(good_stage, bad_stage)
calibration = st.fixed_dictionaries({}, optional={"nsamples": st.sampled_from([2, 4, 4, 0]),
                                                  "seqlen": st.sampled_from([8, 16, 16, 1]),
                                                  "sequential": st.sampled_from(["layer", "block", "layer", "x"]),
                                                  "batch_size": st.sampled_from([1, 2, None, 0])})
good_recipe = st.fixed_dictionaries({"stages": st.lists(stage, min_size=1, max_size=3)},
                                    optional={"calibration": calibration})
recipes = rarely(good_recipe, st.fixed_dictionaries({"stages": st.lists(stage, max_size=3), "extra": anything}))


def weights_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recipes)
def test_every_recipe_runs_or_fails_cleanly_before_changing_anything(d):
    try:
        recipe = Recipe.from_dict(d)
    except PrunekitError as exc:
        assert str(exc)  # rejected while reading: nothing is loaded
        return
    model = copy.deepcopy(MODEL)
    try:
        result = run(recipe, model, data=IDS, progress=False)
    except PrunekitError as exc:
        assert str(exc)
        # the first stage refused before changing the model, or a later stage failed after the first ran
        if len(recipe.stages) == 1:
            assert weights_equal(model, MODEL), f"{d} changed the model, then failed: {exc}"
        return
    assert len(result.report["stages"]) == len(recipe.stages)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=IDS[:1]).logits).all()


flags = st.lists(st.sampled_from([
    ["--structure", "neurons"], ["--structure", "heads"], ["--structure", "layers"], ["--ratio", "0.25"],
    ["--ratio", "1.5"], ["--sparsity", "0.5"], ["--sparsity", "2"], ["--pattern", "2:4"], ["--pattern", "x"],
    ["--heads", "query"], ["--round-to", "8"], ["--latency"], ["--override", "a=0.1"], ["--override", "bad"],
    ["--allocation", "owl"], ["--allocation", "global"], ["--owl-m", "3"], ["--sequential", "block"],
    ["--offload", "cpu"], ["--unreached", "dense"], ["--method", "wanda"], ["--method", "flap"],
    ["--method", "nope"], ["--blocksize", "64"], ["--damp", "2"], ["--recipe", "missing.yaml"],
    ["--nsamples", "0"], ["--seqlen", "4"], ["--ignore", "("],
]), max_size=5)


@settings(max_examples=300, deadline=None)
@given(flags)
def test_every_flag_combination_gives_a_recipe_or_a_named_error(parts):
    from prunekit.cli import build_parser, check_mode_flags
    from prunekit.commands import prune_recipe

    argv = ["prune", "MODEL", "--output", "OUT"] + [a for p in parts for a in p]
    args = build_parser().parse_args(argv)
    assert isinstance(args, argparse.Namespace)
    try:
        check_mode_flags(args)
        recipe = prune_recipe(args)
    except PrunekitError as exc:
        assert str(exc).strip()
        return
    assert isinstance(recipe, Recipe) and len(recipe.stages) == 1

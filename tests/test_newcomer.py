"""A newcomer's first hour: before/after at a glance, nothing lost, say what was done, look
before you leap, and the small things (version, fast help, list, README synopsis)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import last_json, run_cli, tiny_model

README = Path(__file__).resolve().parent.parent / "README.md"
FAST = ("--nsamples", 4, "--seqlen", 64)


@pytest.fixture()
def eval_cache(tmp_path, monkeypatch):
    """A private cache for dense evaluations (the converted default model is not needed)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("PRUNEKIT_CACHE", str(root))
    return root / "eval"


def test_dense_first_then_pruned_and_the_dense_value_is_cached(capsys, tiny_llama_dir, tmp_path, eval_cache):
    args = ("prune", tiny_llama_dir, "--method", "wanda", *FAST, "--eval", "default", "--eval-max-tokens", 512)
    code, out, _ = run_cli(capsys, *args, "--output", tmp_path / "a", "--json", "--quiet")
    first = last_json(out)
    # the dense value is the eval command's perplexity of the unpruned model on the same windows
    code2, out2, _ = run_cli(capsys, "eval", tiny_llama_dir, "--seqlen", 64, "--eval-max-tokens", 512, "--json",
                             "--quiet")
    dense = last_json(out2)
    assert code == code2 == 0 and first["dense_eval_cached"] is False
    assert first["perplexity_before"] == pytest.approx(dense["perplexity"], rel=1e-6)
    assert first["dense"]["params_total"] == dense["params_total"] and first["dense"]["sparsity"] == 0
    assert first["perplexity"] != first["perplexity_before"] and first["tokens"] == 512
    assert len(list(eval_cache.glob("*.json"))) == 1
    # the second run reuses it; the table shows before -> after for a person
    code, out, _ = run_cli(capsys, *args, "--output", tmp_path / "b")
    table = out.splitlines()
    assert code == 0 and any(ln.startswith("perplexity") and "(dense: cached)" in ln for ln in table)
    row = next(ln for ln in table if ln.startswith("perplexity")).split()
    assert float(row[1].replace(",", "")) > 0 and row[1] != row[2]
    for label in ("parameters", "  in pruned layers", "  nonzero", "sparsity", "MACs", "seconds:", "output:"):
        assert any(ln.startswith(label) for ln in table), label
    assert f"output: {tmp_path / 'b'}" in out and "of the weights of the prunable layers" in out
    # a changed model is a new entry
    cfg = Path(tiny_llama_dir) / "config.json"
    os.utime(cfg, ns=(cfg.stat().st_atime_ns, cfg.stat().st_mtime_ns + 10**9))
    code, out, _ = run_cli(capsys, *args, "--output", tmp_path / "c", "--json", "--quiet")
    assert last_json(out)["dense_eval_cached"] is False and len(list(eval_cache.glob("*.json"))) == 2


def test_a_failed_evaluation_keeps_the_saved_result(capsys, tiny_llama_dir, tmp_path, eval_cache, monkeypatch):
    from prunekit import commands
    from prunekit.errors import DataError

    calls = []

    def evaluate(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # the pruned model's evaluation
            raise DataError("evaluation failed on purpose")
        return real(*a, **k)

    real = commands._evaluate
    monkeypatch.setattr(commands, "_evaluate", evaluate)
    out_dir = tmp_path / "out"
    code, _, err = run_cli(capsys, "prune", tiny_llama_dir, *FAST, "--eval", "default", "--eval-max-tokens", 256,
                           "--output", out_dir, "--quiet")
    assert code == 2 and "evaluation failed on purpose" in err and len(calls) == 2
    assert (out_dir / "model.safetensors").is_file() and (out_dir / "prunekit_report.json").is_file()


def test_stale_temporaries_are_cleaned_and_outputs_get_normal_permissions(capsys, caplog, tiny_llama_dir, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs, as a killed run's
    stale = tmp_path / f".out.tmp-{dead.pid}-abc123"
    (stale / "sub").mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"partial")
    alive = tmp_path / f".out.tmp-{os.getpid()}-live"  # a running process's: left alone
    alive.mkdir()
    code, _, err = run_cli(capsys, "prune", tiny_llama_dir, *FAST, "--output", tmp_path / "out")
    assert code == 0 and not stale.exists() and alive.exists()
    assert "left by a run that was killed" in caplog.text
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~mask
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, "out"])


@pytest.fixture(scope="module")
def three_kv_heads_dir(tmp_path_factory, smol_tokenizer):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=512)
    path = tmp_path_factory.mktemp("three-kv")
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return path


def test_achieved_amount_beside_the_requested_one(capsys, three_kv_heads_dir, tmp_path):
    code, out, _ = run_cli(capsys, "prune", three_kv_heads_dir, "--structure", "heads", "--ratio", 0.25,
                           "--method", "l2", *FAST, "--output", tmp_path / "o")
    assert code == 0
    assert "requested ratio 0.25 -> removed 1 of 3 in each of 2 groups (33.3%)" in out
    code, out, _ = run_cli(capsys, "prune", three_kv_heads_dir, "--structure", "heads", "--ratio", 0.25,
                           "--method", "l2", *FAST, "--output", tmp_path / "j", "--json", "--quiet")
    rep = last_json(out)
    assert rep["ratio_achieved"] == pytest.approx(1 / 3) and rep["units_removed"] == 2 and rep["units_before"] == 6


def test_a_ratio_that_removes_nothing_names_the_smallest_that_does(capsys, three_kv_heads_dir, tmp_path):
    code, _, err = run_cli(capsys, "prune", three_kv_heads_dir, "--structure", "heads", "--ratio", 0.1, *FAST,
                           "--output", tmp_path / "o")
    assert code == 2 and "removes nothing" in err and "smallest ratio that removes a unit is 0.167" in err
    assert list(tmp_path.iterdir()) == []
    # and that ratio does remove one head of each group
    code, out, _ = run_cli(capsys, "prune", three_kv_heads_dir, "--structure", "heads", "--ratio", 0.167, *FAST,
                           "--method", "l2", "--output", tmp_path / "o", "--json", "--quiet")
    assert code == 0 and last_json(out)["units_removed"] == 2


@pytest.mark.parametrize("flags", [("--structure", "neurons", "--ratio", 0.25, "--method", "flap"),
                                   ("--structure", "heads", "--ratio", 0.5, "--method", "l2"),
                                   ("--structure", "layers", "--ratio", 0.5),
                                   ("--method", "sparsegpt", "--pattern", "2:4"),
                                   ("--method", "magnitude", "--sparsity", 0.6, "--allocation", "global")])
def test_dry_run_prints_the_plan_the_real_run_follows(capsys, tiny_llama_dir, tmp_path, flags):
    weights_before = (Path(tiny_llama_dir) / "model.safetensors").stat().st_mtime_ns
    code, out, _ = run_cli(capsys, "prune", tiny_llama_dir, *flags, *FAST, "--dry-run", "--json", "--quiet")
    plan = last_json(out)
    assert code == 0 and plan["dry_run"] is True and list(tmp_path.iterdir()) == []
    assert (Path(tiny_llama_dir) / "model.safetensors").stat().st_mtime_ns == weights_before
    code, out, _ = run_cli(capsys, "prune", tiny_llama_dir, *flags, *FAST, "--output", tmp_path / "o", "--json",
                           "--quiet")
    real = last_json(out)
    stage = plan["stages"][0]
    assert code == 0 and plan["params_after"] == real["params_after"]
    report = json.loads((tmp_path / "o" / "prunekit_report.json").read_text())
    assert stage["nonzero_after"] == report["params_nonzero"]
    if "--structure" in flags:
        assert stage["macs_after"] == real["macs_after"] and stage["macs_before"] == real["macs_before"]
        assert [r["removed"] for r in stage["rows"]] == [g["removed"] for g in report["groups"]]
    code, out, _ = run_cli(capsys, "prune", tiny_llama_dir, *flags, *FAST, "--dry-run")
    assert code == 0 and "nothing is changed or written" in out and "params" in out


def test_plan_api_returns_the_same_plan_and_leaves_the_model_alone(smol_tokenizer):
    import prunekit
    from prunekit.planning import Plan

    model = tiny_model("llama", vocab=len(smol_tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = {"calibration": {"nsamples": 2, "seqlen": 64},
              "stages": [{"structure": {"structure": "neurons", "ratio": 0.25, "method": "l2"}},
                         {"weights": {"method": "wanda", "sparsity": 0.5, "pattern": "2:4"}}]}
    plan = prunekit.plan(recipe, model, tokenizer=smol_tokenizer)
    assert isinstance(plan, Plan) and [s.kind for s in plan.stages] == ["structure", "weights"]
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    result = prunekit.run(recipe, model, tokenizer=smol_tokenizer, progress=False)
    assert plan.params_after == result.report["params_total"]
    assert plan.stages[-1].nonzero_after == result.report["params_nonzero"]
    assert "2:4" in str(plan)


def test_version_and_help_do_not_import_torch():
    code = ("import sys, prunekit.cli as c\n"
            "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH', 'torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and "TORCH False" in res.stdout and "prune" in res.stdout
    res = subprocess.run([sys.executable, "-m", "prunekit.cli", "--version"], capture_output=True, text=True)
    import prunekit

    assert res.returncode == 0 and res.stdout.strip() == f"prunekit {prunekit.__version__}"


def test_list_shows_descriptions_defaults_and_papers(capsys):
    code, out, _ = run_cli(capsys, "list", "allocations")
    owl = next(ln for ln in out.splitlines() if ln.strip().startswith("owl"))
    assert code == 0 and "lambda=0.08" in owl and "m=5" in owl and "Yin" in owl
    code, out, _ = run_cli(capsys, "list", "methods", "--json")
    info = last_json(out)["methods"]
    assert info["sparsegpt"]["defaults"] == {"blocksize": 128, "damp": 0.01} and info["wanda"]["paper"]


def _flags(parser) -> set[str]:
    import argparse

    found = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _flags(sub)
        found |= {o for o in action.option_strings if o.startswith("--") and o != "--help"}
    return found


def test_every_flag_is_in_the_readme_synopsis():
    from prunekit.cli import build_parser

    text = README.read_text()
    synopsis = text[text.index("## Command line"):]
    synopsis = synopsis[: synopsis.index("\n## ", 3)]
    missing = sorted(f for f in _flags(build_parser()) if not re.search(re.escape(f) + r"\b", synopsis))
    assert not missing, f"flags missing from the README's Command line section: {missing}"


def test_run_takes_the_same_dry_run_and_before_after_table(capsys, tiny_llama_dir, tmp_path, eval_cache):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("calibration: {nsamples: 4, seqlen: 64}\nstages:\n"
                      "  - structure: {structure: neurons, ratio: 0.25, method: l2}\n"
                      "  - weights: {method: wanda, sparsity: 0.5, pattern: '2:4'}\n")
    code, out, _ = run_cli(capsys, "run", recipe, tiny_llama_dir, "--dry-run")
    assert code == 0 and "1. structure" in out and "2. weights" in out and os.listdir(tmp_path) == ["r.yaml"]
    code, out, _ = run_cli(capsys, "run", recipe, tiny_llama_dir, "--output", tmp_path / "o", "--eval", "default",
                           "--eval-max-tokens", 256)
    assert code == 0 and "stage 1: neurons (l2): requested ratio 0.25" in out and "stage 2: weights" in out
    assert next(ln for ln in out.splitlines() if ln.startswith("perplexity")).count(".") >= 2


def test_atomic_text_writes_clean_up_after_killed_runs(tmp_path):
    from prunekit.atomic import write_text_atomically

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".k.json.tmp-{dead.pid}-xyz"
    stale.write_text("{")
    write_text_atomically(tmp_path / "k.json", "{}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.json"] and (tmp_path / "k.json").read_text() == "{}\n"


def test_a_recipe_can_come_through_a_pipe_and_a_directory_is_named(tiny_llama_dir, tmp_path):
    recipe = "calibration: {nsamples: 2, seqlen: 64}\nstages:\n  - weights: {method: magnitude, sparsity: 0.5}\n"
    res = subprocess.run([sys.executable, "-m", "prunekit.cli", "run", "/dev/stdin", str(tiny_llama_dir), "--dry-run",
                          "--quiet"], input=recipe, capture_output=True, text=True)
    assert res.returncode == 0 and "1. weights: magnitude" in res.stdout, res.stderr
    res = subprocess.run([sys.executable, "-m", "prunekit.cli", "run", str(tmp_path), str(tiny_llama_dir),
                          "--dry-run"], capture_output=True, text=True)
    assert res.returncode == 2 and "is a directory" in res.stderr


def test_training_and_recovery_stages_say_what_they_did(smol_tokenizer):
    import prunekit
    from prunekit.summary import achieved_line

    model = tiny_model("llama", vocab=len(smol_tokenizer))
    recipe = {"calibration": {"nsamples": 2, "seqlen": 64},
              "stages": [{"training": {"sparsity": 0.5, "steps": 4, "frequency": 1}},
                         {"recovery": {"method": "bias_norm", "steps": 2}}]}
    stages = prunekit.run(recipe, model, tokenizer=smol_tokenizer, progress=False).report["stages"]
    train, recover = (achieved_line(s) for s in stages)
    assert train == f"training: requested sparsity 0.5 -> {stages[0]['sparsity']:.2%}" and "None" not in train
    assert recover.startswith("recovery (bias_norm): 2 steps, loss ") and "masks kept" in recover

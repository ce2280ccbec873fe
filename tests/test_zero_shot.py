"""Zero-shot accuracy through lm-eval-harness (prunekit.evaluate.zero_shot), checked against an
independent log-likelihood computation on a real local multiple-choice task."""
from __future__ import annotations

import json
import math
import sys
from importlib.util import find_spec

import pytest
import torch

from conftest import last_json, run_cli

needs_lm_eval = pytest.mark.skipif(find_spec("lm_eval") is None,
                                   reason="lm-eval is not installed (pip install lm-eval, or prunekit[eval])")

#: (context, choices, index of the right choice); some choices are non-ASCII, so that lm-eval's
#: acc_norm (per character) and acc_bytes (per UTF-8 byte) differ
QUESTIONS = [
    ("The capital of France is", ["Paris", "Berlin", "Madrid", "Rome"], 0),
    ("Water freezes at zero degrees", ["Celsius", "Fahrenheit", "Kelvin"], 0),
    ("The opposite of hot is", ["cold", "tall", "green", "loud"], 0),
    ("A week has seven", ["days", "hours", "years", "cats"], 0),
    ("The sun rises in the", ["east", "west", "north", "south"], 0),
    ("Cows drink water and give us", ["milk", "glass", "petrol", "paper"], 0),
    ("The largest city in Switzerland is", ["Geneva", "Zürich", "Bern", "Basel"], 1),
    ("Two plus two equals", ["three", "four", "five", "six"], 1),
    ("The largest city in Brazil is", ["Rio de Janeiro", "São Paulo", "Brasília", "Salvador"], 1),
    ("Birds can fly because they have", ["wings", "wheels", "roots", "fins"], 0),
    ("You write with a pen on a sheet of", ["paper", "iron", "water", "glass"], 0),
    ("The color of the clear sky on a sunny day is", ["blue", "red", "black", "brown"], 0),
    ("The German word for street is", ["Straße", "Haus", "Brot", "Hund"], 0),
    ("The French word for coffee is", ["café", "thé", "pain", "eau"], 0),
]

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: {target}
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
  - metric: acc_bytes
    aggregation: mean
    higher_is_better: true
"""


def write_task(folder, name, rows, target="answer"):
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    (folder / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data, target=target), encoding="utf-8")


def rows():
    return [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    write_task(folder, "mytask", rows())
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    import prunekit

    model, tokenizer = prunekit.load(str(tiny_llama_dir))
    return model.eval(), tokenizer


def choice_logprobs(model, tokenizer, context: str, choices: list[str]) -> list[float]:
    """Sum of log p(choice tokens | context) per choice, computed directly: the choice follows
    the context after one space (lm-eval's default target_delimiter), the context's tokens are
    a prefix of the tokens of context + " " + choice, and the rest are the choice's."""
    ctx = tokenizer(context).input_ids
    out = []
    for choice in choices:
        full = tokenizer(context + " " + choice).input_ids
        assert full[:len(ctx)] == ctx and len(full) > len(ctx), (context, choice)
        with torch.no_grad():
            logp = model(torch.tensor([full])).logits[0].double().log_softmax(-1)  # (T, vocab)
        # token t is predicted at position t - 1
        out.append(sum(float(logp[t - 1, full[t]]) for t in range(len(ctx), len(full))))
    return out


def argmax(values) -> int:
    return max(range(len(values)), key=lambda i: values[i])  # the first of equal values, as numpy's


@pytest.fixture(scope="module")
def expected(tiny):
    """Per question: the choice of the raw, per-character and per-byte normalised log-likelihoods."""
    model, tokenizer = tiny
    picks = []
    for context, choices, _ in QUESTIONS:
        lls = choice_logprobs(model, tokenizer, context, choices)
        picks.append({"raw": argmax(lls), "norm": argmax([ll / len(c) for ll, c in zip(lls, choices)]),
                      "bytes": argmax([ll / len(c.encode("utf-8")) for ll, c in zip(lls, choices)])})
    return picks


def accuracy(picks, kind, n=None):
    chosen = picks[:n] if n else picks
    return sum(p[kind] == q[2] for p, q in zip(chosen, QUESTIONS)) / len(chosen)


def test_task_names_expand_paper_and_drop_duplicates():
    from prunekit.errors import ConfigError
    from prunekit.evaluate.zero_shot import PAPER_TASKS, task_names

    assert PAPER_TASKS == ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
    assert task_names("mytask, paper,rte") == ["mytask", *PAPER_TASKS]
    assert task_names(["boolq", "piqa,boolq"]) == ["boolq", "piqa"]
    with pytest.raises(ConfigError, match="no task names"):
        task_names(" , ")


@needs_lm_eval
def test_accuracy_matches_an_independent_computation(tiny, expected, tmp_path):
    """lm-eval's acc / acc_norm / acc_bytes equal the direct computation, on the real answers
    and, question by question, on copies labelled with the direct argmax (acc must be 1)."""
    import lm_eval

    from prunekit.evaluate.zero_shot import zero_shot

    model, tokenizer = tiny
    assert any(p["norm"] != p["bytes"] for p in expected), "no question tells acc_norm from acc_bytes apart"
    for kind in ("raw", "norm", "bytes"):
        labelled = [{**row, "pick": pick[kind]} for row, pick in zip(rows(), expected)]
        write_task(tmp_path, f"mytask_{kind}", labelled, target="pick")
    write_task(tmp_path, "mytask", rows())
    out = zero_shot(model, tokenizer, ["mytask", "mytask_raw", "mytask_norm", "mytask_bytes"], include_path=tmp_path,
                    progress=False)
    assert out["lm_eval_version"] == lm_eval.__version__ and out["num_fewshot"] == 0 and out["seconds"] > 0
    res = out["tasks"]
    n = len(QUESTIONS)
    assert res["mytask"]["n_examples"] == n
    assert res["mytask"]["acc"] == accuracy(expected, "raw")
    assert res["mytask"]["acc_norm"] == accuracy(expected, "norm")
    assert res["mytask"]["acc_bytes"] == accuracy(expected, "bytes")
    acc = res["mytask"]["acc"]  # lm-eval's stderr of a mean: sample standard deviation / sqrt(n)
    assert res["mytask"]["acc_stderr"] == pytest.approx(math.sqrt(acc * (1 - acc) / (n - 1)))
    assert all(isinstance(v, float) for k, v in res["mytask"].items() if k != "n_examples")
    # every question's pick agrees: labelled with our argmax, lm-eval scores all of them right
    assert res["mytask_raw"]["acc"] == 1.0
    assert res["mytask_norm"]["acc_norm"] == 1.0
    assert res["mytask_bytes"]["acc_bytes"] == 1.0
    assert model.training is False


@needs_lm_eval
def test_cli_eval_reports_zero_shot_beside_perplexity(capsys, tiny_llama_dir, task_dir, expected):
    code, out, err = run_cli(capsys, "eval", tiny_llama_dir, "--tasks", "mytask", "--include-path", task_dir,
                             "--seqlen", 64, "--eval-max-tokens", 256, "--json", "--quiet")
    assert code == 0, err
    rep = last_json(out)
    assert rep["tokens"] == 256 and rep["perplexity"] > 1 and "sparsity" in rep
    zs = rep["zero_shot"]
    assert zs["tasks"]["mytask"]["acc"] == accuracy(expected, "raw")
    assert zs["tasks"]["mytask"]["n_examples"] == len(QUESTIONS) and zs["limit"] is None


@needs_lm_eval
def test_cli_no_perplexity_and_limit(capsys, tiny_llama_dir, task_dir, expected):
    code, out, err = run_cli(capsys, "eval", tiny_llama_dir, "--tasks", "mytask", "--include-path", task_dir,
                             "--limit", 5, "--no-perplexity", "--quiet")
    assert code == 0, err
    assert "perplexity" not in out and "mytask" in out and "zero-shot accuracy" in out
    row = next(line.split() for line in out.splitlines() if line.strip().startswith("mytask"))
    assert float(row[1]) == pytest.approx(accuracy(expected, "raw", 5), abs=5e-5) and row[3] == "5"


@needs_lm_eval
def test_unknown_task_names_it_and_where_tasks_come_from(capsys, tiny_llama_dir, task_dir):
    code, out, err = run_cli(capsys, "eval", tiny_llama_dir, "--tasks", "mytsak", "--include-path", task_dir,
                             "--no-perplexity", "--json", "--quiet")
    assert code == 2 and out == ""
    assert "'mytsak'" in err and "--include-path DIR" in err and "did you mean mytask" in err


@needs_lm_eval
def test_dataset_that_cannot_be_downloaded_is_a_clear_error(tiny, tmp_path, monkeypatch):
    """A task whose dataset lives on the hub, with the hub unreachable (offline mode)."""
    import datasets
    import huggingface_hub

    from prunekit.errors import DataError
    from prunekit.evaluate.zero_shot import zero_shot

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "hubtask.yaml").write_text(TASK_YAML.replace("dataset_path: json", "dataset_path: prunekit-test/none")
                                           .replace("dataset_kwargs:\n  data_files:\n    test: {data}\n", "")
                                           .format(name="hubtask", target="answer"))
    with pytest.raises(DataError, match=r"'hubtask'.*could not be downloaded \(offline\?.*--include-path DIR"):
        zero_shot(*tiny, "hubtask", include_path=tmp_path, progress=False)


def test_lm_eval_missing_names_the_install(capsys, tiny, tiny_llama_dir, monkeypatch):
    from prunekit.errors import PrunekitError
    from prunekit.evaluate.zero_shot import zero_shot

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    with pytest.raises(PrunekitError, match=r"pip install lm-eval"):
        zero_shot(*tiny, "mytask")
    code, out, err = run_cli(capsys, "eval", tiny_llama_dir, "--tasks", "paper", "--quiet")
    assert code == 2 and "pip install lm-eval" in err and "perplexity" not in out


def test_eval_without_tasks_keeps_its_fields(capsys, tiny_llama_dir):
    code, out, err = run_cli(capsys, "eval", tiny_llama_dir, "--seqlen", 64, "--eval-max-tokens", 128, "--json",
                             "--quiet")
    assert code == 0, err
    assert list(last_json(out)) == ["perplexity", "nll", "tokens", "sparsity", "params_total", "params_nonzero",
                                    "seconds", "peak_rss_mb"]


@pytest.mark.parametrize("flag", [["--include-path", "."], ["--limit", "3"], ["--num-fewshot", "2"],
                                  ["--no-perplexity"]])
def test_lm_eval_flags_need_tasks(capsys, tiny_llama_dir, flag):
    code, _, err = run_cli(capsys, "eval", tiny_llama_dir, *flag, "--quiet")
    assert code == 2 and f"{flag[0]} goes with --tasks" in err


@pytest.mark.slow
@needs_lm_eval
def test_smollm2_beats_chance_on_the_local_task(smol_dir, task_dir):
    import prunekit
    from prunekit.evaluate.zero_shot import zero_shot

    model, tokenizer = prunekit.load(str(smol_dir))
    res = zero_shot(model, tokenizer, "mytask", include_path=task_dir, progress=False)["tasks"]["mytask"]
    chance = sum(1 / len(c) for _, c, _ in QUESTIONS) / len(QUESTIONS)
    print(f"SmolLM2-135M on {len(QUESTIONS)} questions: acc {res['acc']:.3f}, acc_norm {res['acc_norm']:.3f}, "
          f"chance {chance:.3f}")
    assert res["acc"] > chance + 0.25

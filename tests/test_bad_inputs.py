"""Bad input, as a newcomer types it: every case exits 2 with one clear line naming the fix,
no traceback, and nothing written (the output place and its parent stay as they were).

``python scripts/bad_input_table.py`` prints the same cases as a table (case, exit code,
message, anything written)."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_cli

RECIPES = {
    "unknown_key.yaml": "stages:\n  - weights: {method: wanda, sparsty: 0.5}\n",
    "wrong_type.yaml": "stages:\n  - weights: {method: wanda, sparsity: half}\n",
    "nm_then_structure.yaml": "stages:\n  - weights: {method: wanda, pattern: '2:4'}\n"
                              "  - structure: {structure: neurons, ratio: 0.2}\n",
    "no_stages.yaml": "calibration: {nsamples: 4}\n",
    "not_yaml.yaml": "stages: [weights: {method: wanda\n",
    "good.yaml": "calibration: {nsamples: 2, seqlen: 64}\nstages:\n  - weights: {method: wanda}\n",
}
TEXTS = {"empty.txt": "", "short.txt": "Too short to calibrate on."}

T = "--nsamples", "2", "--seqlen", "64"  # fast settings where a case gets that far
#: (id, argv with {model}/{out}/{dir} placeholders, words the message must contain)
CASES = [
    ("model missing", ["prune", "{dir}/none", "--output", "{out}"], "does not exist"),
    ("model dir without config", ["prune", "{dir}", "--output", "{out}"], "no config.json"),
    ("model is a text file", ["prune", "{dir}/short.txt", "--output", "{out}"], "is a file"),
    ("gguf missing", ["prune", "{dir}/m.gguf", "--output", "{out}"], "does not exist"),
    ("sparsity 1.0", ["prune", "{model}", "--sparsity", "1.0", "--output", "{out}"], "outside [0, 1)"),
    ("sparsity negative", ["prune", "{model}", "--sparsity", "-0.2", "--output", "{out}"], "outside [0, 1)"),
    ("sparsity removes nothing", ["prune", "{model}", "--sparsity", "0", *T, "--output", "{out}"], "removes nothing"),
    ("pattern 4:2", ["prune", "{model}", "--pattern", "4:2", "--output", "{out}"], "0 < N < M"),
    ("pattern 2:3 on widths of 64", ["prune", "{model}", "--pattern", "2:3", *T, "--output", "{out}"],
     "not divisible by M=3"),
    ("pattern unknown", ["prune", "{model}", "--pattern", "diagonal", "--output", "{out}"], "unknown pattern"),
    ("method unknown", ["prune", "{model}", "--method", "obd", "--output", "{out}"], "unknown method 'obd'"),
    ("allocation unknown", ["prune", "{model}", "--allocation", "bogus", "--output", "{out}"], "unknown allocation"),
    ("owl flags without owl", ["prune", "{model}", "--owl-m", "3", "--output", "{out}"], "--allocation owl"),
    ("calibration text missing", ["prune", "{model}", "--calib", "missing.txt", "--output", "{out}"],
     "does not exist"),
    ("calibration text empty", ["prune", "{model}", "--calib", "{dir}/empty.txt", "--output", "{out}"], "is empty"),
    ("calibration text too short", ["prune", "{model}", "--calib", "{dir}/short.txt", "--output", "{out}"],
     "fewer than one window"),
    ("evaluation text missing", ["prune", "{model}", *T, "--eval", "nope.txt", "--output", "{out}"],
     "does not exist"),
    ("evaluation tokens 0", ["prune", "{model}", *T, "--eval", "default", "--eval-max-tokens", "0",
                             "--output", "{out}"], "--eval-max-tokens"),
    ("nsamples 0", ["prune", "{model}", "--nsamples", "0", "--output", "{out}"], "nsamples must be >= 1"),
    ("seqlen negative", ["prune", "{model}", "--seqlen", "-5", "--output", "{out}"], "seqlen must be >= 1"),
    ("batch size 0", ["prune", "{model}", "--batch-size", "0", "--output", "{out}"], "batch_size must be >= 1"),
    ("output exists", ["prune", "{model}", "--output", "{dir}"], "already exists"),
    ("output under a file", ["prune", "{model}", "--output", "{dir}/short.txt/out"], "is a file"),
    ("no output", ["prune", "{model}"], "--output DIR is required"),
    ("structure without ratio", ["prune", "{model}", "--structure", "neurons", "--output", "{out}"], "--ratio"),
    ("sparsity with structure", ["prune", "{model}", "--structure", "neurons", "--sparsity", "0.5",
                                 "--output", "{out}"], "give --ratio"),
    ("ratio without structure", ["prune", "{model}", "--ratio", "0.2", "--output", "{out}"], "--sparsity"),
    ("pattern with structure", ["prune", "{model}", "--structure", "neurons", "--ratio", "0.2", "--pattern", "2:4",
                                "--output", "{out}"], "--pattern is for weight pruning"),
    ("heads flag on neurons", ["prune", "{model}", "--structure", "neurons", "--ratio", "0.2", "--heads", "query",
                               "--output", "{out}"], "--heads goes with --structure heads"),
    ("structure unknown", ["prune", "{model}", "--structure", "filters", "--ratio", "0.2", "--output", "{out}"],
     "invalid choice"),
    ("ratio removes nothing", ["prune", "{model}", "--structure", "heads", "--ratio", "0.1", *T, "--output", "{out}"],
     "smallest ratio that removes a unit is 0.25"),
    ("ratio removes everything", ["prune", "{model}", "--structure", "neurons", "--ratio", "1.0", *T,
                                  "--output", "{out}"], "ratio"),
    ("experts on a dense model", ["prune", "{model}", "--structure", "experts", "--ratio", "0.5", *T,
                                  "--output", "{out}"], "no mixture-of-experts"),
    ("override malformed", ["prune", "{model}", "--structure", "neurons", "--ratio", "0.2", "--override", "layers",
                            "--output", "{out}"], "use REGEX=R"),
    ("recipe missing", ["prune", "{model}", "--recipe", "{dir}/r.yaml", "--output", "{out}"], "does not exist"),
    ("recipe with method flags", ["prune", "{model}", "--recipe", "{dir}/good.yaml", "--method", "wanda",
                                  "--output", "{out}"], "--recipe replaces the method flags"),
    ("recipe unknown key", ["run", "{dir}/unknown_key.yaml", "{model}", "--output", "{out}"], "sparsty"),
    ("recipe wrong type", ["run", "{dir}/wrong_type.yaml", "{model}", "--output", "{out}"], "sparsity"),
    ("recipe structure after N:M", ["run", "{dir}/nm_then_structure.yaml", "{model}", "--output", "{out}"], "N:M"),
    ("recipe without stages", ["run", "{dir}/no_stages.yaml", "{model}", "--output", "{out}"], "stages"),
    ("recipe not YAML", ["run", "{dir}/not_yaml.yaml", "{model}", "--output", "{out}"], "YAML"),
    ("device without CUDA", ["prune", "{model}", "--device", "cuda:7", "--output", "{out}"], "--device"),
    ("dtype unknown", ["prune", "{model}", "--dtype", "int8", "--output", "{out}"], "invalid choice"),
    ("eval model missing", ["eval", "{dir}/none"], "does not exist"),
    ("list unknown kind", ["list", "bogus"], "unknown registry 'bogus'"),
]


def prepare(root: Path, model: Path) -> dict[str, str]:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in {**RECIPES, **TEXTS}.items():
        (root / name).write_text(text)
    return {"model": str(model), "out": str(root / "out"), "dir": str(root)}


def snapshot(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.mark.parametrize("case,argv,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_and_writes_nothing(capsys, tiny_llama_dir, tmp_path, case, argv, words):
    import torch

    if case == "device without CUDA" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    places = prepare(tmp_path, tiny_llama_dir)
    before = snapshot(tmp_path)
    try:
        code, out, err = run_cli(capsys, *[a.format(**places) for a in argv])
    except SystemExit as exc:  # argparse
        code, (out, err) = exc.code, capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.startswith("prunekit")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("prunekit: error: ") and words in lines[0], err
    assert "Traceback" not in err and out == ""
    assert snapshot(tmp_path) == before  # nothing written, not even a temporary directory


def test_there_are_at_least_thirty_cases():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)

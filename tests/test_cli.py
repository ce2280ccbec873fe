"""The CLI contract: flags, --json last line, exit codes, nothing written on bad input."""
import subprocess
import sys

import pytest
import torch

from conftest import last_json, run_cli
from prunekit.cli import main  # noqa: F401


run = run_cli


@pytest.mark.parametrize("method,pattern", [("magnitude", "unstructured"), ("random", "4:8"), ("wanda", "2:4"),
                                            ("sparsegpt", "unstructured")])
def test_prune_json_then_eval(capsys, tiny_llama_dir, tmp_path, method, pattern):
    out_dir = tmp_path / "out"
    code, out, _ = run(capsys, "prune", tiny_llama_dir, "--method", method, "--sparsity", "0.5", "--pattern", pattern,
                       "--nsamples", 4, "--seqlen", 64, "--seed", 1, "--output", out_dir, "--json", "--quiet")
    assert code == 0
    rep = last_json(out)
    assert rep["sparsity"] == 0.5 and rep["method"] == method and rep["seconds"] > 0 and rep["peak_rss_mb"] > 0
    code, out, _ = run(capsys, "eval", out_dir, "--seqlen", 64, "--max-tokens", 512, "--json", "--quiet")
    ev = last_json(out)
    assert code == 0 and ev["tokens"] == 512 and ev["perplexity"] > 1 and ev["sparsity"] == 0.5


def test_owl_allocation_and_eval_flag(capsys, tiny_llama_dir, tmp_path):
    code, out, _ = run(capsys, "prune", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.7", "--allocation", "owl",
                       "--nsamples", 4, "--seqlen", 64, "--output", tmp_path / "o", "--eval", "default",
                       "--eval-max-tokens", 256, "--json", "--quiet")
    rep = last_json(out)
    assert code == 0 and rep["allocation"] == "owl" and abs(rep["sparsity"] - 0.7) < 0.01 and rep["tokens"] == 256


@pytest.mark.parametrize("args,message", [
    (["--sparsity", "1.0"], "outside [0, 1)"),
    (["--sparsity", "-0.2"], "outside [0, 1)"),
    (["--pattern", "4:2"], "0 < N < M"),
    (["--pattern", "2:3"], "not divisible by M=3"),
    (["--pattern", "diagonal"], "unknown pattern"),
    (["--method", "obd"], "unknown method 'obd'"),
    (["--allocation", "bogus"], "unknown allocation"),
    (["--calib", "missing.txt"], "does not exist"),
])
def test_bad_input_exits_2_and_writes_nothing(capsys, tiny_llama_dir, tmp_path, args, message):
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, "prune", tiny_llama_dir, "--nsamples", 2, "--seqlen", 64, "--output", out_dir, *args)
    assert code == 2 and message in err and "Traceback" not in err
    assert not out_dir.exists() and list(tmp_path.iterdir()) == []


def test_bad_model_paths(capsys, tmp_path):
    code, _, err = run(capsys, "prune", tmp_path / "none", "--output", tmp_path / "o")
    assert code == 2 and "does not exist" in err
    code, _, err = run(capsys, "eval", tmp_path)
    assert code == 2 and "no config.json" in err


def test_too_short_calibration(capsys, tiny_llama_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Too short to calibrate on.")
    code, _, err = run(capsys, "prune", tiny_llama_dir, "--calib", short, "--output", tmp_path / "o")
    assert code == 2 and "fewer than one window" in err and not (tmp_path / "o").exists()


def test_list(capsys):
    code, out, _ = run(capsys, "list", "--json")
    info = last_json(out)
    assert code == 0 and set(info["methods"]) == {"magnitude", "random", "wanda", "sparsegpt", "ria", "gblm"}
    assert set(info["refinements"]) == {"none", "dsnot"}
    assert {"uniform", "global", "owl"} <= set(info["allocations"])


def test_entry_point_help():
    res = subprocess.run([sys.executable, "-m", "prunekit.cli", "prune", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--pattern" in res.stdout and "--allocation" in res.stdout


def test_recipe_replays_the_same_masks(capsys, tiny_llama_dir, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    code, _, _ = run(capsys, "prune", tiny_llama_dir, "--method", "sparsegpt", "--pattern", "4:8", "--nsamples", 4,
                     "--seqlen", 64, "--seed", 3, "--output", first, "--quiet")
    assert code == 0
    code, out, _ = run(capsys, "prune", tiny_llama_dir, "--recipe", first / "prunekit_recipe.yaml",
                       "--output", second, "--json", "--quiet")
    assert code == 0 and last_json(out)["pattern"] == "4:8"
    from safetensors.torch import load_file

    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_missing_recipe(capsys, tiny_llama_dir, tmp_path):
    code, _, err = run(capsys, "prune", tiny_llama_dir, "--recipe", tmp_path / "r.yaml", "--output", tmp_path / "o")
    assert code == 2 and "does not exist" in err


def test_ctrl_c_exits_promptly_with_one_line_and_writes_nothing(tiny_llama_dir, tmp_path):
    """SIGINT in the middle of calibration: exit 130 within seconds, one line on stderr, no
    traceback, no output directory and no temporary directory left behind."""
    import os
    import signal
    import time

    out_dir = tmp_path / "out"
    cmd = [sys.executable, "-m", "prunekit.cli", "prune", str(tiny_llama_dir), "--method", "sparsegpt",
           "--nsamples", "3000", "--seqlen", "64", "--output", str(out_dir)]
    from conftest import default_sigint

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = ""
    deadline = time.time() + 120
    while "pruning (sparsegpt)" not in seen and time.time() < deadline:  # the progress bar of the block loop
        seen += proc.stderr.read(1)
    assert "pruning (sparsegpt)" in seen, seen[-2000:]
    time.sleep(0.05)  # inside the block loop; a fast machine finishes the tiny model in well under a second
    assert proc.poll() is None, "the run ended before the signal"
    proc.send_signal(signal.SIGINT)
    sent = time.time()
    _, err = proc.communicate(timeout=60)
    assert time.time() - sent < 10
    assert proc.returncode == 130
    lines = [ln for ln in (seen + err).replace("\r", "\n").splitlines() if ln.startswith("prunekit:")]
    assert lines == ["prunekit: interrupted (no partial output is ever left behind)"]
    assert "Traceback" not in err and "terminate" not in err
    assert not out_dir.exists() and list(tmp_path.iterdir()) == []

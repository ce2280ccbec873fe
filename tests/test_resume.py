"""Resume (prunekit.calibration.resume and the pipeline's stage checkpoints): a run stopped after
some blocks, or between stages, and started again with the same arguments gives the same
weights, bit for bit, as a run never stopped; another run's checkpoint is refused; and
(slow) the CLI killed with SIGKILL mid-block and run again with the same command."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from prunekit import pipeline
from conftest import ids_for, tiny_model
from prunekit.errors import ConfigError
from prunekit.recipe import Recipe

RECIPE = """
calibration: {nsamples: 6, seqlen: 32, batch_size: 2}
stages:
  - weights: {method: wanda, sparsity: 0.3}
  - weights: {method: sparsegpt, sparsity: 0.5}
"""


class Stop(Exception):
    pass


def fresh(smol_tokenizer):
    return tiny_model("llama", vocab=len(smol_tokenizer), seed=3)


def run(model, tokenizer, ids, checkpoint):
    return pipeline.run(Recipe.from_yaml(RECIPE), model, tokenizer=tokenizer, data=ids, progress=False,
                                 checkpoint=checkpoint)


@pytest.mark.parametrize("stop_at", [(1, 0), (2, 0), (2, 1)])  # (stage, block) after which the run stops
def test_a_stopped_run_resumes_to_the_same_weights(smol_tokenizer, calib_text, tmp_path, monkeypatch, stop_at):
    import prunekit.calibration.runner as runner

    ids = ids_for(smol_tokenizer, calib_text, 6, 32)
    reference = fresh(smol_tokenizer)
    run(reference, smol_tokenizer, ids, None)
    original, seen = runner.save_block, []

    def stopping(ckpt, i, block, hidden, report):
        original(ckpt, i, block, hidden, report)
        seen.append((ckpt.path.name, i))
        if (ckpt.path.name, i) == (f"stage-{stop_at[0]}", stop_at[1]):
            raise Stop

    monkeypatch.setattr(runner, "save_block", stopping)
    with pytest.raises(Stop):
        run(fresh(smol_tokenizer), smol_tokenizer, ids, tmp_path / "ckpt")
    monkeypatch.setattr(runner, "save_block", original)
    resumed = fresh(smol_tokenizer)
    result = run(resumed, smol_tokenizer, ids, tmp_path / "ckpt")
    ref, got = reference.state_dict(), resumed.state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert [s["kind"] for s in result.report["stages"]] == ["weights", "weights"]
    assert result.report["sparsity"] == pytest.approx(0.5)
    done = json.loads((tmp_path / "ckpt" / f"stage-{stop_at[0]}" / "progress.json").read_text())["done"]
    assert done >= stop_at[1] + 1


def test_another_runs_checkpoint_is_refused(smol_tokenizer, calib_text, tmp_path, monkeypatch):
    import prunekit.calibration.runner as runner

    ids = ids_for(smol_tokenizer, calib_text, 6, 32)
    original = runner.save_block

    def stop(*args):
        original(*args)
        raise Stop

    monkeypatch.setattr(runner, "save_block", stop)
    with pytest.raises(Stop):
        run(fresh(smol_tokenizer), smol_tokenizer, ids, tmp_path / "ckpt")
    monkeypatch.setattr(runner, "save_block", original)
    other = ids_for(smol_tokenizer, calib_text, 6, 32, seed=1)  # other calibration windows
    with pytest.raises(ConfigError, match="is from another run.*delete .*ckpt/stage-1 to start this one over"):
        run(fresh(smol_tokenizer), smol_tokenizer, other, tmp_path / "ckpt")


@pytest.mark.slow
def test_sigkill_mid_block_and_the_same_command_resumes_bit_for_bit(tmp_path):
    """The real CLI on SmolLM2-135M (SparseGPT), killed with SIGKILL once 6 of its 30 blocks are
    saved, then run again with the same command: the saved weights equal an uninterrupted run's."""
    cli = [sys.executable, "-m", "prunekit", "prune", "default", "--method", "sparsegpt", "--sparsity", "0.5",
           "--nsamples", "8", "--seqlen", "128", "--batch-size", "4", "--quiet", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = subprocess.run([*cli, "--output", str(tmp_path / "full")], env=env, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr[-2000:]
    out, progress = tmp_path / "resumed", tmp_path / ".resumed.resume" / "stage-1" / "progress.json"
    proc = subprocess.Popen([*cli, "--output", str(out), "--resume"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.loads(progress.read_text())["done"] >= 6:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and json.loads(progress.read_text())["done"] < 30
    again = subprocess.run([*cli, "--output", str(out), "--resume"], env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / ".resumed.resume").exists()  # removed once the result is saved

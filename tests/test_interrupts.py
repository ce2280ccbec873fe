"""Nothing is ever lost, on the real default model: Ctrl-C at every moment of a CLI run
(loading, calibration, saving, evaluation) exits promptly with one line and leaves no partial
output; a run killed with SIGKILL mid-save leaves a temporary directory that the next run
recognises, removes, and then succeeds."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import default_sigint

pytestmark = pytest.mark.slow
INTERRUPTED = "prunekit: interrupted (no partial output is ever left behind)"


def command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "prunekit.cli", "prune", "default", "--method", "sparsegpt", "--nsamples", "4",
            "--seqlen", "128", "--output", str(out), *extra]


class Run:
    """A CLI run whose stderr is read as it comes."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     preexec_fn=default_sigint,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.err = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for chunk in iter(lambda: self.proc.stderr.read(1), ""):
            self.err += chunk

    def wait_for(self, check, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while not check() and time.time() < deadline and self.proc.poll() is None:
            time.sleep(0.01)
        assert check(), f"never happened; stderr tail:\n{self.err[-3000:]}"

    def finish(self, timeout: float = 60) -> float:
        start = time.time()
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return time.time() - start


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize("moment", ["loading", "calibration", "saving", "evaluation"])
def test_ctrl_c_at_every_moment(tmp_path, moment):
    out = tmp_path / "out"
    run = Run(command(out, "--eval", "default", "--eval-max-tokens", "2048"))
    if moment == "loading":
        run.wait_for(lambda: "loading default" in run.err)
        time.sleep(0.2)
    elif moment == "calibration":
        run.wait_for(lambda: "pruning (sparsegpt)" in run.err)
        time.sleep(1.0)
    elif moment == "saving":
        run.wait_for(lambda: bool(temporaries(tmp_path)))
    else:
        run.wait_for(lambda: "evaluating the pruned model" in run.err)
        time.sleep(0.5)
    assert run.proc.poll() is None, "the run ended before the signal"
    run.proc.send_signal(signal.SIGINT)
    took = run.finish()
    lines = [ln for ln in run.err.replace("\r", "\n").splitlines() if ln.startswith("prunekit:")]
    assert run.proc.returncode == 130 and took < 10, (run.proc.returncode, took)
    assert lines == [INTERRUPTED] and "Traceback" not in run.err and "terminate" not in run.err
    assert temporaries(tmp_path) == []
    if moment == "evaluation":  # saved before the evaluation started: the result is kept, whole
        assert (out / "model.safetensors").is_file() and (out / "prunekit_report.json").is_file()
    else:
        assert not out.exists()


def test_a_killed_run_is_cleaned_up_by_the_next(tmp_path):
    out = tmp_path / "out"
    run = Run(command(out, "--quiet"))
    run.wait_for(lambda: bool(temporaries(tmp_path)))
    run.proc.send_signal(signal.SIGKILL)
    run.finish()
    left = temporaries(tmp_path)
    assert run.proc.returncode == -signal.SIGKILL and left and not out.exists()
    again = subprocess.run(command(out, "--json"), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "left by a run that was killed" in again.stderr
    assert temporaries(tmp_path) == [] and (out / "model.safetensors").is_file()

"""Every fenced ```python block of README.md runs verbatim: each in a fresh interpreter
(a subprocess), in an empty temporary working directory, so blocks share nothing and leave
nothing behind. Blocks that load the real default model (SmolLM2-135M) are marked slow."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

README = Path(__file__).resolve().parent.parent / "README.md"
#: a block mentioning one of these loads a real model (minutes on a CPU): marked slow
REAL_MODEL = ('"default"', "'default'", ".gguf", "HuggingFaceTB/", "SmolLM2")
FAST_TIMEOUT_S = 120  # a fast block should take seconds; far more means it should be marked slow
SLOW_TIMEOUT_S = 3600


def fenced_blocks(language: str) -> list[tuple[int, str]]:
    """(line number of the opening fence, code) of every ```language block of the README."""
    blocks, lines = [], README.read_text(encoding="utf-8").splitlines()
    start = None
    for number, line in enumerate(lines, 1):
        if start is None and re.fullmatch(rf"```{language}\s*", line):
            start = number
        elif start is not None and line.strip() == "```":
            blocks.append((start, "\n".join(lines[start:number - 1]) + "\n"))
            start = None
    assert start is None, f"README.md: the ```{language} block at line {start} is never closed"
    return blocks


PYTHON_BLOCKS = fenced_blocks("python")


def is_slow(code: str) -> bool:
    return any(marker in code for marker in REAL_MODEL)


def test_readme_has_python_blocks():
    assert len(PYTHON_BLOCKS) >= 4
    assert any(is_slow(code) for _, code in PYTHON_BLOCKS) and not all(is_slow(code) for _, code in PYTHON_BLOCKS)


@pytest.mark.parametrize("line, code", [
    pytest.param(line, code, id=f"line{line}", marks=[pytest.mark.slow] if is_slow(code) else [])
    for line, code in PYTHON_BLOCKS
])
def test_python_block_runs_verbatim(line, code, tmp_path):
    work, tmp = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    timeout = SLOW_TIMEOUT_S if is_slow(code) else FAST_TIMEOUT_S
    began = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"README.md line {line}: the block ran over {timeout} s"
                    + ("" if is_slow(code) else "; if it is meant to, it should load a real model (marked slow)"))
    seconds = time.perf_counter() - began
    assert proc.returncode == 0, (f"README.md line {line}: the block failed (exit {proc.returncode}) after "
                                  f"{seconds:.1f} s\n--- code\n{code}--- stdout\n{proc.stdout}--- stderr\n"
                                  f"{proc.stderr[-6000:]}")
    print(f"README.md line {line}: {seconds:.1f} s\n{proc.stdout}")


def test_recipe_in_python_block_is_the_yaml_block():
    """The Python block that writes recipe.yaml writes exactly the recipe shown in the
    ```yaml block headed ``# recipe.yaml``, so the two cannot drift apart."""
    shown = [code for _, code in fenced_blocks("yaml") if code.startswith("# recipe.yaml")]
    assert len(shown) == 1
    writers = [code for _, code in PYTHON_BLOCKS if 'Path("recipe.yaml").write_text(' in code]
    assert len(writers) == 1
    written = re.search(r'write_text\("""\\\n(.*?)"""\)', writers[0], re.S)
    assert written is not None
    assert yaml.safe_load(written.group(1)) == yaml.safe_load(shown[0])
    assert written.group(1) == shown[0].split("\n", 1)[1]

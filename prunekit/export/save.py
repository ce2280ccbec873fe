"""Saving a pruned model as a standard Hugging Face directory plus its recipe and report.
The directory is written under a temporary name and renamed into place: never half-written."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..atomic import write_dir_atomically
from ..errors import OutputError

RECIPE_FILE = "prunekit_recipe.yaml"
REPORT_FILE = "prunekit_report.json"


def check_output(path: str | Path, overwrite: bool = False) -> Path:
    """Fail early, before any work, if ``path`` cannot receive a result."""
    out = Path(path).expanduser()
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise OutputError(f"output {out} already exists; choose a new directory or pass --overwrite")
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write under {parent}: permission denied")
    return out


def save_pretrained(model: nn.Module, tokenizer: Any, path: str | Path, *, recipe_yaml: str,
                    report: dict[str, Any], overwrite: bool = False) -> Path:
    """Write model (safetensors), tokenizer, recipe and report to ``path`` atomically."""
    out = check_output(path, overwrite)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / RECIPE_FILE).write_text(recipe_yaml, encoding="utf-8")
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        structure = getattr(model, "prunekit_structure", None)
        if structure is not None:  # a structurally pruned model: keep what rebuilds it
            (tmp / "prunekit_structure.json").write_text(json.dumps(structure, indent=1) + "\n", encoding="utf-8")

    return write_dir_atomically(out, write, replace=True)

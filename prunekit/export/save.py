"""Saving a pruned model as a standard Hugging Face directory plus its recipe and report.
The directory is written under a temporary name and renamed into place: never half-written."""
from __future__ import annotations

import logging

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..atomic import clean_stale, write_dir_atomically
from ..errors import ConfigError, OutputError

RECIPE_FILE = "prunekit_recipe.yaml"
REPORT_FILE = "prunekit_report.json"
WEIGHTS_FILE = "model.safetensors"


log = logging.getLogger(__name__)

def check_output(path: str | Path, overwrite: bool = False) -> Path:
    """Fail early, before any work, if ``path`` cannot receive a result; temporary
    directories that killed runs left next to it are removed first."""
    out = Path(path).expanduser()
    clean_stale(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise OutputError(f"output {out} already exists; choose a new directory or pass --overwrite")
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot create {out}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write under {parent}: permission denied")
    return out


def save(result: Any, path: str | Path, *, overwrite: bool = False, format: str = "dense") -> Path:
    """Write a :class:`~prunekit.result.Result` to ``path`` atomically: a Hugging Face directory
    (weights, config, tokenizer) for HF models, ``model.safetensors`` for plain PyTorch ones;
    ``prunekit_recipe.yaml`` (every stage that produced the model, replayable);
    ``prunekit_report.json``; and, when the architecture changed, ``prunekit_structure.json``
    (every tensor's shape; written non-uniform only when no config describes the model); and
    ``prunekit_permutations.safetensors`` when N:M groups were formed over permuted inputs.

    ``format="compact"`` stores the weights at the size of what they keep (bitmask + values, or
    N:M values + positions; :mod:`prunekit.export.compact`) instead of ``model.safetensors``;
    a model packing would shrink by less than 1% (a structurally pruned one) is saved the usual way."""
    from ..calibration import distributed
    from .compact import FORMATS

    if format not in FORMATS:
        raise ConfigError(f"unknown checkpoint format {format!r}; use one of {', '.join(FORMATS)}")
    out = check_output(path, overwrite) if distributed.rank() == 0 else Path(path)
    if distributed.active():  # every rank holds the same result: rank 0 alone writes it, the others wait for it
        if distributed.rank() == 0:
            try:
                _save(result, out, format)
            finally:
                torch.distributed.barrier()
        else:
            torch.distributed.barrier()
        return out
    return _save(result, out, format)


def _save(result: Any, out: Path, format: str) -> Path:
    from .compact import write_compact
    from .structure import STRUCTURE_FILE, fit_hf_config, structure_record

    model = result.model
    is_hf = hasattr(model, "save_pretrained") and hasattr(model, "config")
    uniform = fit_hf_config(model) if is_hf else False
    structural = any(h.get("kind") in ("structure", "budget") for h in result.history)
    record = structure_record(model, uniform) if (structural or not uniform) else None
    if is_hf and not uniform:
        log.warning("%s has sizes its config cannot describe (per-layer sizes, or heads x head_dim != hidden "
                    "size as in BERT); %s reloads with prunekit.load(path), as the class it was saved from, "
                    "not with plain from_pretrained", type(model).__name__, out)
    recipe_yaml = result.recipe.to_yaml() if result.recipe is not None else None
    from ..patterns.permute import PERMS_ATTR, PERMUTATIONS_FILE

    perms = model.__dict__.get(PERMS_ATTR) or {}

    def write(tmp: Path) -> None:
        packed = format == "compact" and write_compact(tmp, model.state_dict()) is not None
        if is_hf:
            if packed:  # the config (and generation config) describe it; the weights are packed
                model.config.architectures = [type(model).__name__]  # as save_pretrained records it
                model.config.save_pretrained(tmp)
                if getattr(model, "generation_config", None) is not None and model.can_generate():
                    model.generation_config.save_pretrained(tmp)
            else:
                model.save_pretrained(tmp)
            if result.tokenizer is not None:
                result.tokenizer.save_pretrained(tmp)
        elif not packed:
            from safetensors.torch import save_model

            save_model(model, str(tmp / WEIGHTS_FILE))
        if record is not None:
            (tmp / STRUCTURE_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        if recipe_yaml is not None:
            (tmp / RECIPE_FILE).write_text(recipe_yaml, encoding="utf-8")
        if perms:  # layers whose N:M groups are over permuted inputs: the orders a sparse kernel needs
            from safetensors.torch import save_file

            save_file({n: p.detach().cpu().clone() for n, p in perms.items()}, str(tmp / PERMUTATIONS_FILE))
        (tmp / REPORT_FILE).write_text(json.dumps(result.report, indent=2, default=str) + "\n", encoding="utf-8")

    return write_dir_atomically(out, write, replace=True)

"""The public Python API: ``run(recipe, model)`` and its one-stage shorthand ``prune``, plus
``load`` / ``save`` / ``evaluate_perplexity``. Every call returns one
:class:`~prunekit.result.Result`."""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from .calibration.text import calibration_windows, load_text, tokenize
from .config import PruneConfig
from .errors import ConfigError
from .evaluate import Perplexity, perplexity
from .export import REPORT_FILE, RECIPE_FILE, save
from .models.loading import load_model
from .models.placement import parse_device, place
from .patterns.permute import PERMUTATIONS_FILE, input_permutations
from .recipe import Recipe, one_stage, stage_kind, stage_to_dict
from .result import PruneResult, Result

log = logging.getLogger(__name__)


def load(model: str | Path, *, device: Any = None, dtype: Any = "auto") -> Result:
    """Load a model from a local dir (a saved result included), hub id, .gguf file or
    ``default``, in ``dtype`` (``auto``: as stored, or float32/bfloat16/float16), with the
    recipe, report and history it was saved with. With ``device`` (``auto``, ``cpu``,
    ``cuda``, ``cuda:N``) the model moves there if it fits; otherwise it stays in CPU memory and
    pruning moves one block at a time (pass the same ``device`` to :func:`prune`).

    Unpacks as ``model, tokenizer = prunekit.load(...)``."""
    m, tok, source = load_model(model, dtype)
    if device is not None:
        place(m, parse_device(device))
    recipe, report = None, {}
    folder = Path(source)
    if (folder / RECIPE_FILE).is_file():
        recipe = Recipe.from_yaml(folder / RECIPE_FILE)
    if (folder / REPORT_FILE).is_file():
        try:
            report = json.loads((folder / REPORT_FILE).read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            log.warning("%s is not valid JSON; loading without the report", folder / REPORT_FILE)
    history = [{"kind": stage_kind(s), "config": stage_to_dict(s)} for s in recipe.stages] if recipe else []
    if (folder / PERMUTATIONS_FILE).is_file():  # N:M groups over permuted inputs: kept for reports and kernels
        from safetensors.torch import load_file

        input_permutations(m).update(load_file(str(folder / PERMUTATIONS_FILE)))
    return Result(m, recipe, report, history, tok)


def as_config(config: PruneConfig | str | dict[str, Any] | None) -> PruneConfig:
    """A PruneConfig from a config, a method name, a recipe dict, or a YAML recipe path."""
    if config is None:
        return PruneConfig.from_method("wanda")
    if isinstance(config, PruneConfig):
        return config
    if isinstance(config, dict):
        return PruneConfig.from_dict(config)
    if isinstance(config, str):
        if config.endswith((".yaml", ".yml")):
            return PruneConfig.from_yaml(Path(config))
        return PruneConfig.from_method(config)
    raise ConfigError(f"config must be a PruneConfig, method name, dict or YAML path, not {type(config).__name__}")


def calibration_data(tokenizer: Any, text: str, config: PruneConfig) -> Tensor:
    """(nsamples, seqlen) token windows from a text spec (file, ``default``, hub name)."""
    c = config.calibration
    return calibration_windows(tokenize(tokenizer, load_text(text, "calib")), c.nsamples, c.seqlen, c.seed)


def _model(model: nn.Module | str | Result, dtype: Any, tokenizer: Any) -> tuple[nn.Module, Any, Result | None]:
    if isinstance(model, Result):
        return model.model, tokenizer or model.tokenizer, model
    if isinstance(model, str):
        loaded = load(model, dtype=dtype)
        return loaded.model, tokenizer or loaded.tokenizer, loaded if loaded.recipe is not None else None
    return model, tokenizer, None


def run(recipe: Recipe | str | Path | dict[str, Any], model: nn.Module | str | Result, data: Any = None, *,
        tokenizer: Any = None, progress: bool = True, device: Any = None, dtype: Any = "auto") -> Result:
    """Run every stage of ``recipe`` (a Recipe, YAML path or text, or dict) on ``model`` in place.

    ``model``: an nn.Module, a MODEL spec string (loaded in ``dtype``), or a previous Result
    (its stages are continued). ``data``: calibration data instead of the recipe's text: a
    :class:`~prunekit.calibration.CalibrationData`, (N, T) token ids, or anything
    :func:`~prunekit.calibration.as_calibration` takes. ``device``: where blocks compute
    (``auto``, ``cpu``, ``cuda``, ``cuda:N``; default: where the model is)."""
    from .pipeline import run as run_pipeline

    if isinstance(recipe, dict):
        recipe = Recipe.from_dict(recipe)
    elif not isinstance(recipe, Recipe):
        recipe = Recipe.from_yaml(recipe)
    module, tokenizer, previous = _model(model, dtype, tokenizer)
    if device is not None:
        device = place(module, parse_device(device))
    if isinstance(data, str):
        recipe = Recipe(recipe.stages, replace(recipe.calibration, text=data))
        data = None
    return run_pipeline(recipe, module, tokenizer=tokenizer, data=data, device=device, progress=progress,
                        previous=previous)


def prune(model: nn.Module | str | Result, config: Any = None, data: Any = None, *, tokenizer: Any = None,
          progress: bool = True, device: Any = None, dtype: Any = "auto") -> Result:
    """Prune ``model`` in place with one stage and report: the one-stage shorthand of :func:`run`.

    ``config``: a PruneConfig (weights), a StructureConfig (structure), a method name, a recipe
    dict or YAML path. ``data``: calibration data, or a text spec tokenised with ``tokenizer``.
    """
    from .structural import StructureConfig

    stage = config if isinstance(config, StructureConfig) else as_config(config)
    recipe = one_stage(stage)
    return run(recipe, model, data, tokenizer=tokenizer, progress=progress, device=device, dtype=dtype)


def evaluate_perplexity(model: nn.Module, tokenizer: Any, text: str = "default", *, seqlen: int = 512,
                        max_tokens: int | None = None, progress: bool = True) -> Perplexity:
    """Perplexity of ``model`` on a text spec's evaluation split."""
    return perplexity(model, tokenize(tokenizer, load_text(text, "eval")), seqlen, max_tokens, progress)


__all__ = ["Result", "PruneResult", "run", "prune", "load", "save", "as_config", "calibration_data",
           "evaluate_perplexity"]

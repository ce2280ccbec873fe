"""The public Python API: ``prune(model, config, data) -> PruneResult``, plus load/evaluate."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from .calibration.text import calibration_windows, load_text, tokenize
from .config import PruneConfig
from .errors import ConfigError
from .evaluate import Perplexity, peak_rss_mb, perplexity, sparsity_report
from .export import save_pretrained
from .models.loading import load_model
from .models.placement import parse_device, place
from .schedules import prune_oneshot

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    """A pruned model (pruned in place), the recipe that produced it, and its report."""

    model: nn.Module
    config: PruneConfig
    report: dict[str, Any]
    tokenizer: Any = field(default=None, repr=False)

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Save as a Hugging Face directory with ``prunekit_recipe.yaml`` and ``prunekit_report.json``."""
        return save_pretrained(self.model, self.tokenizer, path, recipe_yaml=self.config.to_yaml(),
                               report=self.report, overwrite=overwrite)


def load(model: str, *, device: Any = None, dtype: Any = "auto") -> tuple[nn.Module, Any]:
    """Load (model, tokenizer) from a local dir, hub id, .gguf file or ``default``, in
    ``dtype`` (``auto``: as stored, or float32/bfloat16/float16). With ``device`` (``auto``,
    ``cpu``, ``cuda``, ``cuda:N``) the model moves there if it fits; otherwise it stays in CPU
    memory and pruning moves one block at a time (pass the same ``device`` to :func:`prune`)."""
    m, tok, _ = load_model(model, dtype)
    if device is not None:
        place(m, parse_device(device))
    return m, tok


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


def prune(model: nn.Module | str, config: PruneConfig | str | dict[str, Any] | None = None,
          data: Any = None, *, tokenizer: Any = None, progress: bool = True, device: Any = None,
          dtype: Any = "auto") -> PruneResult:
    """Prune ``model`` in place and report.

    ``model``: an nn.Module (HF causal LM) or a MODEL spec string (loaded in ``dtype``).
    ``config``: PruneConfig, method name, recipe dict or YAML path. ``data``: a
    :class:`~prunekit.calibration.CalibrationData`, (nsamples, seqlen) token ids, or a text
    spec (file, ``default``, hub dataset) tokenised with ``tokenizer``. ``device``: where
    blocks compute (``auto``, ``cpu``, ``cuda``, ``cuda:N``; default: where the model is);
    a model in CPU memory stays there and each block visits the device in turn.
    """
    cfg = as_config(config)
    if isinstance(model, str):
        model, loaded_tok, _ = load_model(model, dtype)
        tokenizer = tokenizer or loaded_tok
    if device is not None:
        device = place(model, parse_device(device))
    if isinstance(data, str):
        data = calibration_data(tokenizer, data, cfg) if cfg.needs_data else None
    start = time.perf_counter()
    outcome = prune_oneshot(model, cfg, data, progress=progress, device=device)
    seconds = time.perf_counter() - start
    nm = (cfg.pattern.n, cfg.pattern.m) if cfg.pattern.kind == "nm" else None
    report = sparsity_report(model, nm=nm, ignore=cfg.target.ignore)
    for name, amount in outcome.amounts.items():
        report["layers"][name]["allocated"] = amount
    if outcome.unreached:
        report["unreached"] = outcome.unreached
    weight = next(model.parameters())
    report.update(seconds=seconds, peak_rss_mb=peak_rss_mb(), method=cfg.method, pattern=str(cfg.pattern),
                  allocation=cfg.allocation.name, target_sparsity=cfg.sparsity, dtype=str(weight.dtype).split(".")[-1],
                  device=str(device if device is not None else weight.device))
    log.info("pruned to %.4f sparsity in %.1f s", report["sparsity"], seconds)
    return PruneResult(model, cfg, report, tokenizer)


def evaluate_perplexity(model: nn.Module, tokenizer: Any, text: str = "default", *, seqlen: int = 512,
                        max_tokens: int | None = None, progress: bool = True) -> Perplexity:
    """Perplexity of ``model`` on a text spec's evaluation split."""
    return perplexity(model, tokenize(tokenizer, load_text(text, "eval")), seqlen, max_tokens, progress)


__all__ = ["PruneResult", "prune", "load", "as_config", "calibration_data", "evaluate_perplexity"]

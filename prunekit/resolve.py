"""Resolving stage configs into the registry entries they name: the validation that needs the
registries. Configs (:mod:`prunekit.config`, :mod:`prunekit.structural.config`) only check
values and ranges, so they import no registry; a recipe runs :func:`check` on every stage when
it is read, before any model is loaded, and the one-stage APIs run it before they start."""
from __future__ import annotations

from typing import Any

from .errors import ConfigError


def check_weights(cfg: Any) -> None:
    """Every name a weights config uses is registered, with parameters its entry accepts."""
    from .allocation import ALLOCATIONS
    from .reconstruct import RECONSTRUCTIONS
    from .scoring import SCORES

    from .reconstruct.sparsegpt import SparseGPTParams

    SCORES.get(cfg.score)
    RECONSTRUCTIONS.get(cfg.reconstruction)
    check_refine(cfg)
    ALLOCATIONS.get(cfg.allocation.name).params_for(cfg.allocation)
    sgpt = sparsegpt_params(cfg)
    if not isinstance(sgpt, SparseGPTParams):
        raise ConfigError(f"sparsegpt parameters must be SparseGPTParams(blocksize, damp), got {sgpt!r}")
    if cfg.pattern.kind == "nm" and cfg.reconstruction == "sparsegpt" and sgpt.blocksize % cfg.pattern.m:
        raise ConfigError(f"SparseGPT blocksize {sgpt.blocksize} must be a multiple of M={cfg.pattern.m}")


def check_refine(cfg: Any) -> None:
    """The refinement is registered and its parameters are its own parameter class."""
    from .refine import REFINEMENTS

    REFINEMENTS.get(cfg.refine)
    params = REFINEMENTS.params_of(cfg.refine)
    if cfg.refine_params is not None and (params is None or not isinstance(cfg.refine_params, params)):
        want = f"{params.__name__}(...)" if params is not None else "none"
        raise ConfigError(f"refinement {cfg.refine!r} takes {want} as its parameters, got {cfg.refine_params!r}")


def sparsegpt_params(cfg: Any) -> Any:
    """The weights config's SparseGPT parameters (their defaults when it names none)."""
    from .reconstruct.sparsegpt import SparseGPTParams

    return cfg.sparsegpt if cfg.sparsegpt is not None else SparseGPTParams()


def check_structure(cfg: Any) -> None:
    """The structure's score is registered for that structure."""
    if cfg.method is None:
        return  # resolved by the model kind when pruning
    if cfg.method == "slicegpt":  # a rotation of the residual stream, not a unit score
        from .structural.slicegpt import check_config

        check_config(cfg)
    elif cfg.structure == "layers":
        from .structural.layers import LAYER_SCORES

        LAYER_SCORES.get(cfg.method)
    elif cfg.structure == "experts":
        from .structural.experts import EXPERT_SCORES

        EXPERT_SCORES.get(cfg.method)
    else:
        from .structural.scores import check_applies

        check_applies(cfg.method, cfg.structure)


def check(stage: Any) -> None:
    """Validate one stage against the registries (a no-op for stages that name no entry)."""
    from .config import PruneConfig
    from .structural.config import StructureConfig

    if isinstance(stage, PruneConfig):
        check_weights(stage)
    elif isinstance(stage, StructureConfig):
        check_structure(stage)


def needs_data(cfg: Any) -> bool:
    """Whether a weights config needs calibration data (its score, reconstruction or allocation)."""
    from .allocation import ALLOCATIONS
    from .scoring import SCORES

    score = SCORES.get(cfg.score)
    proxy = SCORES.get(score.allocation_proxy)
    alloc_needs = ALLOCATIONS.get(cfg.allocation.name).uses_scores and bool(proxy.needs)
    return bool(score.needs) or cfg.reconstruction != "none" or cfg.refine != "none" or alloc_needs


__all__ = ["check", "check_weights", "check_structure", "needs_data", "sparsegpt_params"]

"""prunekit: prune neural networks so they get smaller and faster while keeping what they know.

The public names load lazily (PEP 562), so ``import prunekit`` and ``prunekit --help`` do not
import torch; the first use of a name imports the module that defines it."""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> (module, attribute)
_LAZY = {
    "run": ("api", "run"), "prune": ("api", "prune"), "load": ("api", "load"), "save": ("api", "save"),
    "plan": ("planning", "plan"), "Plan": ("planning", "Plan"),
    "evaluate_perplexity": ("api", "evaluate_perplexity"), "calibration_data": ("api", "calibration_data"),
    "CalibrationData": ("calibration", "CalibrationData"),
    "Allocation": ("config", "Allocation"), "Calibration": ("config", "Calibration"), "Pattern": ("config", "Pattern"),
    "PruneConfig": ("config", "PruneConfig"), "Target": ("config", "Target"),
    "SparseGPTParams": ("reconstruct.sparsegpt", "SparseGPTParams"),
    "PrunekitError": ("errors", "PrunekitError"),
    "CalibrationSpec": ("recipe", "CalibrationSpec"), "Recipe": ("recipe", "Recipe"),
    "catalogue": ("registry", "catalogue"),
    "list": ("registry", "names"),  # prunekit.list(kind, pattern), as timm.list_models
    "PruneResult": ("result", "PruneResult"), "Result": ("result", "Result"),
    "StructureResult": ("result", "StructureResult"),
    "RecoveryStage": ("stages", "RecoveryStage"), "TrainingStage": ("stages", "TrainingStage"),
    "StructureConfig": ("structural", "StructureConfig"), "prune_structure": ("structural", "prune_structure"),
}
#: subpackages reachable as attributes without importing them first (``prunekit.kv.cache(...)``)
_SUBPACKAGES = ("kv",)
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)  # the import binds it as an attribute
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'prunekit' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBPACKAGES})

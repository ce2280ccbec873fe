"""prunekit: prune neural networks so they get smaller and faster while keeping what they know."""
from .api import calibration_data, evaluate_perplexity, load, prune, run, save
from .calibration import CalibrationData
from .config import Allocation, Calibration, Pattern, PruneConfig, Target
from .reconstruct.sparsegpt import SparseGPTParams
from .errors import PrunekitError
from .recipe import CalibrationSpec, Recipe
from .registry import catalogue
from .registry import names as list  # noqa: A001 - prunekit.list(kind, pattern), as timm.list_models
from .result import PruneResult, Result, StructureResult
from .stages import RecoveryStage, TrainingStage
from .structural import StructureConfig, prune_structure

__version__ = "0.1.0"
__all__ = [
    "run", "prune", "load", "save", "list", "catalogue", "evaluate_perplexity", "calibration_data", "Result", "Recipe",
    "CalibrationSpec", "CalibrationData", "PruneConfig", "StructureConfig", "TrainingStage", "RecoveryStage",
    "Pattern", "Allocation", "Calibration", "SparseGPTParams", "Target", "PrunekitError", "prune_structure",
    "PruneResult", "StructureResult",
]

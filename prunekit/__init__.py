"""prunekit: prune neural networks so they get smaller and faster while keeping what they know."""
from .api import PruneResult, calibration_data, evaluate_perplexity, load, prune
from .config import Allocation, Calibration, Pattern, PruneConfig, SparseGPTParams, Target
from .errors import PrunekitError
from .structural import StructureConfig, StructureResult, prune_structure

__version__ = "0.1.0"
__all__ = [
    "prune", "load", "evaluate_perplexity", "calibration_data", "PruneResult", "PruneConfig",
    "Pattern", "Allocation", "Calibration", "SparseGPTParams", "Target", "PrunekitError",
    "prune_structure", "StructureConfig", "StructureResult",
]

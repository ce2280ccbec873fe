"""The refinement axis: after a mask is chosen (and weights reconstructed), change which
weights are kept without training. ``none`` keeps the mask; ``dsnot`` swaps weights in and
out to shrink the expected reconstruction error. One file per method, registered in
``REFINEMENTS``."""
from . import dsnot  # noqa: F401  (registration)
from .base import REFINEMENTS, RefineProblem

__all__ = ["REFINEMENTS", "RefineProblem"]

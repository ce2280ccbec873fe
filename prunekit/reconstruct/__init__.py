"""Reconstruction: choose masks for a group of layers and repair what remains."""
from . import mask_only, sparsegpt  # noqa: F401  (registration)
from .base import RECONSTRUCTIONS, GroupProblem, Segment

__all__ = ["RECONSTRUCTIONS", "GroupProblem", "Segment"]

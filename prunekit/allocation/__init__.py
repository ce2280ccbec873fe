"""Allocation: per-layer sparsities from the overall target. Registered in ``ALLOCATIONS``."""
from . import erk, global_minimum, global_threshold, owl, uniform  # noqa: F401  (registration)
from .base import ALLOCATIONS, AllocationRule, LayerRef, register_allocation

__all__ = ["ALLOCATIONS", "AllocationRule", "LayerRef", "register_allocation"]

"""Structural pruning: find coupled units in any model and physically remove them.

>>> from prunekit.structural import StructureConfig, prune_structure
>>> result = prune_structure(model, StructureConfig("neurons", 0.2), data=token_ids)
>>> result.save("out/")
"""
from .config import StructureConfig
from .graph import Graph, Group, Member, build_graph
from .prune import StructureResult, count_params, prune_structure
from .remove import mask_units, masked_units, remove_masked_units, remove_units
from .scores import GROUP_SCORES

__all__ = [
    "StructureConfig", "StructureResult", "prune_structure", "build_graph", "Graph", "Group", "Member",
    "remove_units", "mask_units", "remove_masked_units", "masked_units", "count_params", "GROUP_SCORES",
]

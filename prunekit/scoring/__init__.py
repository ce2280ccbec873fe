"""Scores: how important each weight is. One file per score, registered in ``SCORES``."""
from . import gblm, magnitude, obs, random, ria, taylor, wanda  # noqa: F401  (registration)
from .base import SCORES, LayerStats, Score, register_score

__all__ = ["SCORES", "LayerStats", "Score", "register_score"]

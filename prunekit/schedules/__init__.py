"""Schedules: when and how often to prune. One-shot post-training pruning for now."""
from .oneshot import prune_oneshot

__all__ = ["prune_oneshot"]

"""Schedules: when and how often to prune. One-shot post-training pruning; and, for training
loops (driven by :class:`prunekit.training.SparsityController`), gradual magnitude pruning,
iterative pruning with rewinding (lottery tickets), pruning at initialisation, and dynamic
sparse training (SET, RigL)."""
from .at_init import INIT_SCORES, AtInit, prune_at_init
from .base import PruneContext, TrainingSchedule, select_masks, shuffle_masks
from .gradual import Gradual
from .iterative import Iterative, LotteryTicket, reinitialize
from .oneshot import prune_oneshot
from .regrow import DynamicSparse

__all__ = ["prune_oneshot", "Gradual", "Iterative", "LotteryTicket", "reinitialize", "AtInit", "prune_at_init",
           "INIT_SCORES", "DynamicSparse", "PruneContext", "TrainingSchedule", "select_masks", "shuffle_masks"]

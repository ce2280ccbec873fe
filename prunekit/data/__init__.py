"""Training-data pruning: score every example, keep the hard (or easy) fraction.

``score(method, dataset, ...)`` gives (N,) scores (higher = harder; ``prunekit list
data_scores``): EL2N and GraNd (Paul et al. 2021), forgetting events (Toneva et al. 2019),
self-supervised prototypes (Sorscher et al. 2022), random; ``lm_loss`` and ``ifd`` (Li et al.
2024) score text for fine-tuning under a causal language model (``lm=LanguageModel(model,
tokenizer)``). ``select(scores, remove=0.3, mode="hard")`` gives the
indices to keep (``class_balanced`` optional) for any ``torch.utils.data.Dataset``;
``train(..., indices=..., distill=Distillation(teacher))`` trains on the pruned set.
"""
from __future__ import annotations

from ..lazy import lazy_getattr

_LAZY = {
    "score": "scores", "DATA_SCORES": "scores", "ScoreInputs": "scores", "select": "selection", "subset": "selection",
    "lm_loss": "text", "ifd": "text", "train": "training", "TrainConfig": "training", "Distillation": "training",
    "accuracy": "training", "labels_of": "training", "predict": "training", "LanguageModel": "text",
}
__all__ = sorted(_LAZY)
__getattr__ = lazy_getattr(__name__, _LAZY)

"""One result for every capability: the model, the whole recipe that produced it, one report
(a section per stage) and the history of what ran. One :func:`prunekit.save` writes it, one
:func:`prunekit.load` reads it back."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from torch import nn


@dataclass
class Result:
    """A model, the :class:`~prunekit.recipe.Recipe` of every stage that produced it (None for a
    model nothing was done to), ``report`` (totals, plus ``stages``: one report per stage) and
    ``history`` (one entry per stage run, in order; training stages add their losses).

    Unpacks as ``model, tokenizer = result`` so that ``prunekit.load`` keeps its old form.
    """

    model: nn.Module
    recipe: Any = None
    report: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    tokenizer: Any = field(default=None, repr=False)

    def save(self, path: str | Path, *, overwrite: bool = False, format: str = "dense") -> Path:
        """Write weights, tokenizer, recipe, report (and the structure record when the
        architecture changed) to ``path``, atomically; ``format="compact"`` packs sparse
        weights (bitmask + values, N:M values + positions), reloaded bit-exact by ``prunekit.load``."""
        from .export import save

        return save(self, path, overwrite=overwrite, format=format)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.tokenizer))

    @property
    def config(self) -> Any:
        """The last stage's config (the one-stage results of earlier versions had only this)."""
        return self.recipe.stages[-1] if self.recipe is not None else None

    @property
    def record(self) -> dict[str, Any]:
        """Every tensor's shape (what a reload of a structurally pruned model needs)."""
        return {"shapes": {n: list(t.shape) for n, t in self.model.state_dict(keep_vars=True).items()}}


#: the names of the two result classes this one replaces
PruneResult = Result
StructureResult = Result

__all__ = ["Result", "PruneResult", "StructureResult"]

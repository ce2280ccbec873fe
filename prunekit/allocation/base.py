"""The allocation axis: how much of each layer to prune, given the overall target."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from torch import Tensor

from ..errors import ConfigError
from ..registry import Registry

if TYPE_CHECKING:
    from ..config import Allocation


@dataclass(frozen=True)
class LayerRef:
    """A candidate layer as allocation sees it. ``scores()`` computes its (out, in) allocation
    scores on demand, so only one layer's scores are in memory at a time. ``shape`` is the
    parameter's own shape (e.g. ``(out, in, kh, kw)`` for a convolution) for rules that use
    it (ERK); None means the (out, in) view is the shape."""

    name: str
    block: int
    numel: int
    scores: Callable[[], Tensor]
    shape: tuple[int, ...] | None = None


#: fn(layers, overall sparsity, the entry's parameters or None) -> per-layer amounts
AllocateFn = Callable[[Sequence[LayerRef], float, Any], list[float]]


def build_params(cls: type | None, values: Mapping[str, Any], what: str) -> Any:
    """An entry's parameter dataclass from ``values`` (YAML names; ``ALIASES`` maps names that
    are Python keywords), with errors naming the entry and the keys it takes."""
    if cls is None:
        if values:
            raise ConfigError(f"{what} takes no parameters; remove {sorted(values)}")
        return None
    aliases = getattr(cls, "ALIASES", {})
    known = {f.name for f in fields(cls)}
    kwargs = {aliases.get(k, k): v for k, v in values.items()}
    unknown = set(kwargs) - known
    if unknown:
        shown = sorted({next((y for y, f in aliases.items() if f == k), k) for k in known})
        raise ConfigError(f"{what} does not take {sorted(unknown)}; its parameters: {', '.join(shown)}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{what}: {exc}") from None


@dataclass(frozen=True)
class AllocationRule:
    """A registered allocation: the function, whether it reads scores (uniform does not), and
    the frozen dataclass of its parameters (None: it takes none)."""

    fn: AllocateFn
    uses_scores: bool
    params: type | None = None

    def params_for(self, alloc: Allocation) -> Any:
        return build_params(self.params, dict(alloc.params), f"allocation {alloc.name!r}")

    def __call__(self, layers: Sequence[LayerRef], sparsity: float, alloc: Allocation) -> list[float]:
        return self.fn(layers, sparsity, self.params_for(alloc))


ALLOCATIONS: Registry[AllocationRule] = Registry("allocation")


def register_allocation(name: str, *, uses_scores: bool = True, params: type | None = None,
                        paper: str = "") -> Callable[[AllocateFn], AllocateFn]:
    """Register ``fn`` as allocation ``name`` taking the parameter dataclass ``params``;
    ``paper``: its citation (see :mod:`prunekit.registry`)."""
    def add(fn: AllocateFn) -> AllocateFn:
        ALLOCATIONS.register(name, paper=paper, params=params)(AllocationRule(fn, uses_scores, params))
        return fn

    return add

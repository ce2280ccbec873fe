"""One registry per concept (scores, patterns, allocations, reconstructions, methods, ...),
and one catalogue over all of them: ``prunekit list [KIND] [PATTERN]`` and
:func:`prunekit.list`, after timm's ``list_models``."""
from __future__ import annotations

import fnmatch
import importlib
import inspect
from typing import Any, Callable, Generic, Iterator, TypeVar

from .errors import ConfigError

T = TypeVar("T")

#: every registry by its plural name (``scores``, ``allocations`` ...)
ALL: dict[str, "Registry[Any]"] = {}
#: modules whose import registers entries
_PROVIDERS = ("prunekit.config", "prunekit.scoring", "prunekit.patterns", "prunekit.allocation", "prunekit.reconstruct",
              "prunekit.structural.scores", "prunekit.structural.layers", "prunekit.structural.experts",
              "prunekit.schedules.at_init", "prunekit.models.adapters")


class Registry(Generic[T]):
    """A name -> entry map with helpful errors.

    >>> SCORES = Registry("score")
    >>> @SCORES.register("magnitude")
    ... def magnitude(w, stats): ...
    """

    def __init__(self, kind: str, plural: str | None = None) -> None:
        self.kind = kind
        self.plural = plural or kind.replace(" ", "_") + "s"
        self._entries: dict[str, T] = {}
        ALL[self.plural] = self

    def register(self, name: str) -> Callable[[T], T]:
        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            return entry

        return add

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


def describe(entry: Any) -> str:
    """The first line of an entry's docstring (or of the function it wraps)."""
    for obj in (entry, getattr(entry, "fn", None)):
        if obj is None:
            continue
        if isinstance(obj, tuple) and len(obj) == 2:
            return f"score={obj[0]}, reconstruction={obj[1]}"
        doc = inspect.getdoc(obj) if callable(obj) and not isinstance(obj, type) else None
        if doc and not doc.startswith(("A registered", "dict(", "tuple(")):
            return doc.splitlines()[0].strip()
    return ""


def _load() -> None:
    for module in _PROVIDERS:
        importlib.import_module(module)


def catalogue(kind: str | None = None, pattern: str = "*") -> dict[str, dict[str, str]]:
    """``{kind: {name: one-line description}}`` of every registry (or one ``kind``), names
    matching ``pattern`` (``*`` wildcards)."""
    _load()
    extra = {"structures": {s: "" for s in ("channels", "neurons", "heads", "width", "layers", "experts")},
             "stages": {s: "" for s in ("structure", "weights", "training", "recovery")}}
    kinds = sorted([*ALL, *extra])
    if kind is not None and kind not in kinds:
        raise ConfigError(f"unknown registry {kind!r}; choose one of: {', '.join(kinds)}")
    out = {}
    for k in [kind] if kind else kinds:
        if k in extra:
            out[k] = {n: d for n, d in extra[k].items() if fnmatch.fnmatch(n, pattern)}
        else:
            out[k] = {n: describe(ALL[k].get(n)) for n in ALL[k].names(pattern)}
    return out


def names(kind: str | None = None, pattern: str = "*") -> dict[str, list[str]] | list[str]:
    """Registered names: of one ``kind`` as a list, or of every registry as ``{kind: [names]}``."""
    found = {k: list(v) for k, v in catalogue(kind, pattern).items()}
    return found[kind] if kind else found

"""One registry per concept (scores, patterns, allocations, reconstructions, methods, ...),
and one catalogue over all of them: ``prunekit list [KIND] [PATTERN]`` and
:func:`prunekit.list`, after timm's ``list_models``.

What the catalogue says of an entry (:class:`EntryInfo`) comes from three places:

- its description is the first line of its function's docstring (a one-line summary);
  entries without a function of their own (model adapters) give ``description=`` when they
  register, and method presets describe themselves by their score and reconstruction;
- its defaults are the fields of its parameter dataclass (``params=`` at registration), under
  their YAML names;
- its paper is ``paper=`` at registration, written ``"Authors YEAR, Title (Short name)"``
  (empty for entries no paper introduced: uniform, random, unstructured, ...).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, Mapping, TypeVar

from .errors import ConfigError

T = TypeVar("T")

#: every registry by its plural name (``scores``, ``allocations`` ...)
ALL: dict[str, "Registry[Any]"] = {}
#: modules whose import registers entries
_PROVIDERS = ("prunekit.config", "prunekit.scoring", "prunekit.patterns", "prunekit.allocation", "prunekit.reconstruct",
              "prunekit.refine", "prunekit.structural.scores", "prunekit.structural.layers",
              "prunekit.structural.experts", "prunekit.schedules.at_init", "prunekit.models.adapters",
              "prunekit.delta.ops", "prunekit.data.scores", "prunekit.tokens",
              "prunekit.kv.policies")


class Registry(Generic[T]):
    """A name -> entry map with helpful errors.

    >>> SCORES = Registry("score")
    >>> @SCORES.register("magnitude", paper="Han et al. 2015, Learning both Weights and Connections ...")
    ... def magnitude(w, stats):
    ...     "Weight magnitude |W| (data-free)."
    """

    def __init__(self, kind: str, plural: str | None = None) -> None:
        self.kind = kind
        self.plural = plural or kind.replace(" ", "_") + "s"
        self._entries: dict[str, T] = {}
        self._about: dict[str, _About] = {}
        ALL[self.plural] = self

    def register(self, name: str, *, paper: str = "", params: type | None = None,
                 description: str | None = None) -> Callable[[T], T]:
        """Register an entry as ``name``. ``paper``: the citation of the paper it comes from
        (``"Authors YEAR, Title (Short name)"``; empty when none). ``params``: the frozen
        dataclass of its parameters, whose defaults the catalogue shows. ``description``: only
        for entries with no docstring of their own (data entries such as model adapters)."""
        if params is not None and not (isinstance(params, type) and dataclasses.is_dataclass(params)):
            raise TypeError(f"{self.kind} {name!r}: params must be a dataclass, got {params!r}")

        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            self._about[name] = _About(paper, params, description)
            return entry

        return add

    def params_of(self, name: str) -> type | None:
        """The parameter dataclass of entry ``name`` (None: it takes none)."""
        self.get(name)
        return self._about[name].params

    def info(self, name: str) -> EntryInfo:
        """What the catalogue says of entry ``name``: description, defaults and paper."""
        entry, about = self.get(name), self._about[name]
        if isinstance(entry, tuple) and len(entry) == 2:  # a method preset: (score, reconstruction)
            return _preset_info(self.plural, name, *entry)
        return EntryInfo(name, self.plural, about.description or describe(entry), param_defaults(about.params),
                         about.paper)

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


@dataclass(frozen=True)
class _About:
    paper: str = ""
    params: type | None = None
    description: str | None = None


@dataclass(frozen=True)
class EntryInfo:
    """One catalogue entry. ``kind``: its registry's plural name (``allocations``);
    ``description``: one line; ``defaults``: its parameters (YAML names) and their default
    values, ``{}`` when it takes none; ``paper``: ``"Authors YEAR, Title (Short name)"``, or
    ``""`` for entries no paper introduced. ``dataclasses.asdict`` gives its JSON form."""

    name: str
    kind: str
    description: str
    defaults: dict[str, Any] = field(default_factory=dict, hash=False)
    paper: str = ""

    @property
    def citation(self) -> str:
        """The paper in short: ``"Yin et al. 2024 (OWL)"`` from ``"Yin et al. 2024, Outlier ... (OWL)"``."""
        authors, short = _short_paper(self.paper)
        return f"{authors} ({short})" if short else authors


def _short_paper(paper: str) -> tuple[str, str]:
    """``("Yin et al. 2024", "OWL")`` from ``"Yin et al. 2024, Outlier ... (OWL)"``."""
    authors, _, title = paper.partition(", ")
    short = title.rsplit(" (", 1)[1].removesuffix(")") if title.endswith(")") and " (" in title else ""
    return authors, short


def describe(entry: Any) -> str:
    """The first line of the docstring of an entry's function (``entry.fn`` for registered
    wrappers such as :class:`~prunekit.scoring.Score`), without reST markup or the final
    period; ``""`` when it has none (data entries: they register with ``description=``)."""
    if isinstance(entry, tuple) and len(entry) == 2:
        return f"score {entry[0]} + reconstruction {entry[1]}"
    target = getattr(entry, "fn", entry)
    if not (inspect.isroutine(target) or inspect.isclass(target)):
        return ""
    doc = (inspect.getdoc(target) or "").strip()
    return doc.splitlines()[0].replace("``", "").strip().removesuffix(".") if doc else ""


def param_defaults(cls: type | None) -> dict[str, Any]:
    """``{field: default}`` of a parameter dataclass, under the names a recipe uses (its
    ``ALIASES`` map YAML names onto fields named differently, e.g. OWL's ``lambda``)."""
    if cls is None:
        return {}
    yaml_name = {f: y for y, f in getattr(cls, "ALIASES", {}).items()}
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = None  # required: no default
        out[yaml_name.get(f.name, f.name)] = value
    return out


def _preset_info(kind: str, name: str, score: str, reconstruction: str) -> EntryInfo:
    """A method preset described by its components: their defaults, and the paper of the
    reconstruction (else of the score)."""
    parts = [ALL["scores"].info(score), ALL["reconstructions"].info(reconstruction)]
    defaults = {k: v for p in parts for k, v in p.defaults.items()}
    paper = parts[1].paper or parts[0].paper
    return EntryInfo(name, kind, describe((score, reconstruction)), defaults, paper)


def _load() -> None:
    for module in _PROVIDERS:
        importlib.import_module(module)


#: The kinds the catalogue lists besides the registries: ``name -> (description, paper)``.
_PSEUDO: dict[str, dict[str, tuple[str, str]]] = {
    "structures": {
        "channels": ("Conv channels; hidden width on transformers", ""),
        "neurons": ("MLP hidden units (intermediate size)", ""),
        "heads": ("Attention heads (key/value groups or query)", ""),
        "width": ("Hidden (residual) width of every block", ""),
        "layers": ("Whole blocks (depth pruning)", ""),
        "experts": ("MoE experts, router resized", ""),
    },
    "stages": {
        "structure": ("Remove units: channels, heads, layers, ...", ""),
        "weights": ("Zero weights: score, pattern, allocation, ...", ""),
        "training": ("Gradual pruning while fine-tuning",
                     "Zhu & Gupta 2017, To prune, or not to prune: exploring the efficacy of pruning for model "
                     "compression (GMP)"),
        "recovery": ("Fine-tune, masks kept (bias/norm or LoRA)",
                     "Zimmer et al. 2023, PERP: Rethinking the Prune-Retrain Paradigm in the Era of LLMs (PERP)"),
    },
}


def _kinds() -> list[str]:
    _load()
    return sorted([*ALL, *_PSEUDO])


def entries(kind: str | None = None, pattern: str = "*") -> dict[str, list[EntryInfo]]:
    """``{kind: [EntryInfo, ...]}`` of every registry and pseudo-kind (``structures``,
    ``stages``), or of one ``kind``; names matching ``pattern`` (``*`` wildcards), sorted
    (stages in the order a recipe runs them)."""
    kinds = _kinds()
    if kind is not None and kind not in kinds:
        raise ConfigError(f"unknown registry {kind!r}; choose one of: {', '.join(kinds)}")
    out: dict[str, list[EntryInfo]] = {}
    for k in [kind] if kind else kinds:
        if k in _PSEUDO:
            out[k] = [EntryInfo(n, k, d, {}, p) for n, (d, p) in _PSEUDO[k].items() if fnmatch.fnmatch(n, pattern)]
        else:
            out[k] = [ALL[k].info(n) for n in ALL[k].names(pattern)]
    return out


def catalogue(kind: str | None = None, pattern: str = "*") -> dict[str, dict[str, str]]:
    """``{kind: {name: one-line description}}`` of every registry (or one ``kind``), names
    matching ``pattern`` (``*`` wildcards); :func:`entries` gives defaults and papers too."""
    return {k: {e.name: e.description for e in found} for k, found in entries(kind, pattern).items()}


def _value(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def _cite(e: EntryInfo, width: int) -> str:
    """The short citation, or only its authors and year when the short name does not fit."""
    return e.citation if len(e.citation) <= width else _cut(_short_paper(e.paper)[0], width)


def _defaults(e: EntryInfo) -> str:
    return ", ".join(f"{k}={_value(v)}" for k, v in e.defaults.items())


def format_entries(found: Mapping[str, list[EntryInfo]], width: int = 120) -> str:
    """The text ``prunekit list`` prints for :func:`entries`' result: per kind a header, then
    per entry one line, ``name  description  defaults  paper``, in columns aligned over all
    kinds, each line at most ``width`` characters (papers shown short, ``Yin et al. 2024
    (OWL)``, or ``Yin et al. 2024`` where that does not fit; what still does not fit ends in
    …). Kinds with no entries are left out; ``""`` when nothing is left."""
    shown = [e for group in found.values() for e in group]
    if not shown:
        return ""
    gap, indent = "  ", "  "
    name_w = max(len(e.name) for e in shown)
    about_w = max(len(e.description) for e in shown)
    defaults_w = min(max(len(_defaults(e)) for e in shown), 26)
    paper_w = max(len(e.citation) for e in shown)
    room = width - len(indent) - name_w - len(gap) * (1 + (defaults_w > 0) + (paper_w > 0))
    # the paper keeps room for its authors and year (up to 24), the description takes the rest
    authors_w = min(max(len(_short_paper(e.paper)[0]) for e in shown), 24)
    about_w = max(min(about_w, room - defaults_w - authors_w), 16)
    paper_w = max(min(paper_w, room - about_w - defaults_w), 0)
    lines = []
    for kind, group in found.items():
        if not group:
            continue
        lines.append(f"{kind}:")
        for e in group:
            cells = [e.name.ljust(name_w), _cut(e.description, about_w).ljust(about_w)]
            if defaults_w:
                cells.append(_cut(_defaults(e), defaults_w).ljust(defaults_w))
            if paper_w:
                cells.append(_cite(e, paper_w))
            lines.append((indent + gap.join(cells)).rstrip())
    return "\n".join(lines)


def names(kind: str | None = None, pattern: str = "*") -> dict[str, list[str]] | list[str]:
    """Registered names: of one ``kind`` as a list, or of every registry as ``{kind: [names]}``."""
    found = {k: list(v) for k, v in catalogue(kind, pattern).items()}
    return found[kind] if kind else found

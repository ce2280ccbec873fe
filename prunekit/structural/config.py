"""The typed, frozen configuration of a structural prune, with YAML in/out for recipes."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError

STRUCTURES = ("channels", "neurons", "heads", "width", "layers", "experts")
#: The group kinds each structure prunes ("channels" on a language model is its hidden width).
KINDS = {"channels": ("channels", "width"), "neurons": ("neurons",), "heads": ("heads",), "width": ("width",)}
#: The score each structure uses when none is given.
DEFAULT_METHOD = {"layers": "block_influence", "experts": "frequency"}


@dataclass(frozen=True)
class StructureConfig:
    """What to remove and how to choose it.

    ``structure``: channels (conv channels; hidden width on transformers), neurons (MLP
    hidden units), heads (attention heads: key/value groups, or with ``heads="query"`` the
    same number of query heads from every group; ``auto``, the default: kv where every
    layer has several key/value heads, else query, as multi-query attention needs), width, layers (whole blocks), experts
    (MoE experts, router resized). ``ratio``: fraction of units removed, in [0, 1).
    ``method``: the group score (see :data:`prunekit.structural.scores.GROUP_SCORES`); None
    picks one by the structure and the model (:func:`default_method`): block influence for
    layers, routing frequency for experts, FLAP for language models (measured: the data-free
    ``l2`` is worse than random on SmolLM2) and ``l2`` for other networks (CNNs).
    ``allocation``: ``uniform`` (every group loses ``ratio`` of its units) or ``global``
    (one threshold over scores normalised per group). ``overrides``: ``(regex, ratio)``
    pairs; the first whose regex matches a group's name sets that group's ratio.
    ``ignore``: regexes of group/parameter names left whole. ``round_to``: keep a
    multiple of this many units per group (e.g. 8 for tensor-core friendly widths).
    ``blocks``: ``(start, stop)``: only groups inside blocks start..stop-1 lose units (the
    block-wise range of LLM-Pruner, Ma et al. 2023, which keeps the first and last blocks
    whole); neurons and heads with uniform allocation.
    """

    structure: str = "channels"
    ratio: float = 0.5
    method: str | None = None
    allocation: str = "uniform"
    overrides: tuple[tuple[str, float], ...] = ()
    ignore: tuple[str, ...] = ()
    heads: str = "auto"
    round_to: int = 1
    bias_compensation: bool | None = None
    blocks: tuple[int, int] | None = None
    nsamples: int = 32
    seqlen: int = 256
    batch_size: int = 4
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.method is not None:
            object.__setattr__(self, "method", str(self.method).replace("-", "_"))
        object.__setattr__(self, "overrides", tuple((str(p), float(r)) for p, r in self.overrides))
        object.__setattr__(self, "ignore", tuple(self.ignore))
        if self.structure not in STRUCTURES:
            raise ConfigError(f"unknown structure {self.structure!r}; choose one of: {', '.join(STRUCTURES)}")
        if not (0.0 <= float(self.ratio) < 1.0):
            raise ConfigError(f"ratio {self.ratio} is outside [0, 1); it is the fraction of units removed, e.g. 0.25")
        if self.allocation not in ("uniform", "global"):
            raise ConfigError(f"unknown structural allocation {self.allocation!r}; use 'uniform' or 'global'")
        if self.heads not in ("auto", "kv", "query"):
            raise ConfigError(f"heads={self.heads!r}: use 'kv' (whole key/value groups), 'query' (query heads) "
                              "or 'auto' (kv where a layer has several key/value heads, else query)")
        if self.round_to < 1:
            raise ConfigError(f"round_to={self.round_to} must be >= 1")
        if self.blocks is not None:
            b = tuple(self.blocks)
            if len(b) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in b) \
                    or not (0 <= b[0] < b[1]):
                raise ConfigError(f"blocks={self.blocks!r}: give (start, stop) block indices with 0 <= start < stop "
                                  "(stop excluded), e.g. (4, 30) as LLM-Pruner prunes")
            if self.structure not in ("neurons", "heads") or self.allocation != "uniform":
                raise ConfigError(f"blocks={list(b)} limits which blocks lose units: it goes with --structure "
                                  f"neurons or heads and uniform allocation, not {self.structure}/{self.allocation}")
            object.__setattr__(self, "blocks", b)
        for pattern, ratio in self.overrides:
            _regex(pattern)
            if not (0.0 <= float(ratio) < 1.0):
                raise ConfigError(f"override ratio {ratio} for {pattern!r} is outside [0, 1)")
        for pattern in self.ignore:
            _regex(pattern)
        for name in ("nsamples", "seqlen", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        # the score's name is checked against its registry when a recipe is resolved (prunekit.resolve)

    @classmethod
    def create(cls, structure: str, ratio: float, method: str | None = None, **kw: Any) -> StructureConfig:
        """A config; ``method`` None is resolved by :func:`default_method` when pruning."""
        return cls(structure=structure, ratio=ratio, method=method, **kw)

    def resolved(self, model: Any) -> StructureConfig:
        """This config with ``method`` filled in for ``model`` (see :func:`default_method`)."""
        from dataclasses import replace

        return self if self.method is not None else replace(self, method=default_method(self.structure, model))

    @property
    def kinds(self) -> tuple[str, ...]:
        return KINDS.get(self.structure, ())

    def ratio_for(self, group: str) -> float:
        for pattern, ratio in self.overrides:
            if re.search(pattern, group):
                return float(ratio)
        if self.blocks is not None:
            index = re.search(r"(?:^|\.)(\d+)(?:\.|$)", group)  # a block's groups are named <blocks>.<i>.<...>
            if index is None:
                raise ConfigError(f"group {group!r} is not inside a numbered block, so blocks={list(self.blocks)} "
                                  "cannot place it; use overrides instead")
            if not (self.blocks[0] <= int(index.group(1)) < self.blocks[1]):
                return 0.0
        return float(self.ratio)

    def ignored(self, name: str) -> bool:
        return any(re.search(p, name) for p in self.ignore)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        d["overrides"] = [list(o) for o in self.overrides]
        d["ignore"] = list(self.ignore)
        d["blocks"] = list(self.blocks) if self.blocks is not None else None
        return {"structural": d}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StructureConfig:
        body = dict(d.get("structural", d))
        unknown = set(body) - {f for f in cls.__dataclass_fields__ if f != "extra"}
        if unknown:
            raise ConfigError(f"unknown structural recipe keys {sorted(unknown)}")
        body["overrides"] = tuple((str(p), float(r)) for p, r in body.get("overrides", ()))
        body["ignore"] = tuple(body.get("ignore", ()))
        if body.get("blocks") is not None:
            body["blocks"] = tuple(body["blocks"])
        return cls(**body)

    @classmethod
    def from_yaml(cls, path: str | Path) -> StructureConfig:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read recipe {path}: {exc}") from exc
        if isinstance(data, dict) and "stages" in data:  # a staged recipe: its one structure stage
            from ..recipe import Recipe

            stages = [s for s in Recipe.from_dict(data).stages if isinstance(s, cls)]
            if len(stages) != 1:
                raise ConfigError(f"this recipe has {len(stages)} structure stages; read it with prunekit.Recipe.from_yaml")
            return stages[0]
        return cls.from_dict(data)


def default_method(structure: str, model: Any) -> str:
    """The score a structure uses when none is given: by the structure for layers and experts;
    for units, ``flap`` on language models (Hugging Face models with input embeddings) and
    ``l2`` on other networks."""
    if structure in DEFAULT_METHOD:
        return DEFAULT_METHOD[structure]
    is_lm = hasattr(model, "config") and callable(getattr(model, "get_input_embeddings", None))
    return "flap" if is_lm else "l2"


def _regex(pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"bad regex {pattern!r}: {exc}") from exc

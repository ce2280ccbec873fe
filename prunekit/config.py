"""Typed, frozen configuration. Strings ("2:4", "owl") are parsed once, here."""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError
from .registry import Registry

Group = Literal["row", "layer"]

#: A method is a preset over the axes: name -> (score, reconstruction).
METHODS: Registry[tuple[str, str]] = Registry("method")
METHODS.register("magnitude")(("magnitude", "none"))
METHODS.register("random")(("random", "none"))
METHODS.register("wanda")(("wanda", "none"))
METHODS.register("sparsegpt")(("obs", "sparsegpt"))
METHODS.register("ria")(("ria", "none"))
METHODS.register("gblm")(("gblm", "none"))

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Pattern:
    """Which shapes the zeros may take.

    ``unstructured`` compares scores within a group: each output ``row`` (Wanda's
    per-output comparison) or the whole ``layer``; ``None`` takes the score's own
    default. ``nm`` keeps ``n`` of every ``m`` consecutive weights along the input
    dimension of every row (2:4 is what sparse tensor cores accelerate).
    """

    kind: Literal["unstructured", "nm"] = "unstructured"
    n: int = 0
    m: int = 0
    group: Group | None = None

    def __post_init__(self) -> None:
        if self.kind == "nm":
            if not (0 < self.n < self.m):
                raise ConfigError(
                    f"N:M pattern {self.n}:{self.m} needs 0 < N < M (N weights kept of every M); "
                    "use e.g. 2:4 or 4:8"
                )
        elif self.kind != "unstructured":
            raise ConfigError(f"unknown pattern kind {self.kind!r}; use 'unstructured' or 'nm'")
        if self.group not in (None, "row", "layer"):
            raise ConfigError(f"unknown comparison group {self.group!r}; use 'row' or 'layer'")

    @classmethod
    def parse(cls, text: str | Pattern) -> Pattern:
        """Parse ``unstructured``, ``unstructured:row``, ``unstructured:layer`` or ``N:M``."""
        if isinstance(text, Pattern):
            return text
        s = str(text).strip().lower()
        if match := _NM.match(s):
            return cls(kind="nm", n=int(match[1]), m=int(match[2]))
        kind, _, group = s.partition(":")
        if kind == "unstructured" and group in ("", "row", "layer"):
            return cls(kind="unstructured", group=group or None)  # type: ignore[arg-type]
        raise ConfigError(
            f"unknown pattern {text!r}; use 'unstructured', 'unstructured:row', "
            "'unstructured:layer', or N:M such as '2:4' or '4:8'"
        )

    @property
    def sparsity(self) -> float | None:
        """The sparsity an N:M pattern implies (None for unstructured)."""
        return 1.0 - self.n / self.m if self.kind == "nm" else None

    def __str__(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        return "unstructured" + (f":{self.group}" if self.group else "")


@dataclass(frozen=True)
class Allocation:
    """How much to prune in each layer: an allocation entry by ``name`` and its parameters
    (``params``: ``(key, value)`` pairs, checked by the entry's own parameter class when a
    recipe is resolved, e.g. OWL's ``m`` and ``lambda``). ``owl_m``/``owl_lambda`` are the
    older spelling of OWL's two parameters."""

    name: str = "uniform"
    owl_m: float | None = None
    owl_lambda: float | None = None
    params: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        params = dict(self.params.items() if isinstance(self.params, dict) else self.params)
        if self.owl_m is not None:
            params.setdefault("m", self.owl_m)
        if self.owl_lambda is not None:
            params.setdefault("lambda", self.owl_lambda)
        object.__setattr__(self, "params", tuple(sorted(params.items())))
        object.__setattr__(self, "owl_m", None)
        object.__setattr__(self, "owl_lambda", None)

    def to_dict(self) -> dict[str, Any] | str:
        return {"name": self.name, **dict(self.params)} if self.params else self.name


@dataclass(frozen=True)
class Calibration:
    """Calibration samples: ``nsamples`` random windows of ``seqlen`` tokens, run through the
    model ``batch_size`` windows at a time (None: all at once).

    ``sequential``: ``"layer"`` prunes each layer just before it runs, from inputs produced by
    the already-pruned layers before it, in one pass per block ("true sequential");
    ``"block"`` takes every layer's statistics from the block before pruning and runs the
    block twice (the order of the Wanda and SparseGPT reference code; less memory).
    ``offload``: where block inputs wait between blocks: ``none`` (where blocks compute),
    ``cpu`` (CPU memory while blocks run on an accelerator) or ``disk`` (memory-mapped files).
    """

    nsamples: int = 32
    seqlen: int = 512
    batch_size: int | None = 4
    seed: int = 0
    sequential: Literal["layer", "block"] = "layer"
    offload: Literal["none", "cpu", "disk"] = "none"

    def __post_init__(self) -> None:
        for name in ("nsamples", "seqlen", "batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"calibration {name} must be >= 1, got {getattr(self, name)}")
        if self.sequential not in ("layer", "block"):
            raise ConfigError(f"unknown sequential order {self.sequential!r}; use 'layer' or 'block'")
        if self.offload not in ("none", "cpu", "disk"):
            raise ConfigError(f"unknown offload {self.offload!r}; use 'none', 'cpu' or 'disk'")


@dataclass(frozen=True)
class Target:
    """Which layers are candidates: every Linear/Conv1D inside the model's blocks,
    except those whose full name matches one of the ``ignore`` regular expressions."""

    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for rx in self.ignore:
            try:
                re.compile(rx)
            except re.error as exc:
                raise ConfigError(f"ignore pattern {rx!r} is not a valid regular expression: {exc}") from None


@dataclass(frozen=True)
class PruneConfig:
    """A complete one-shot pruning recipe: one choice on each axis of DESIGN.md."""

    score: str = "wanda"
    reconstruction: str = "none"
    sparsity: float = 0.5
    pattern: Pattern = field(default_factory=Pattern)
    allocation: Allocation = field(default_factory=Allocation)
    calibration: Calibration = field(default_factory=Calibration)
    sparsegpt: Any = None  # SparseGPT's parameters (reconstruct/sparsegpt.py), None: its defaults
    refine: str = "none"  # a mask refinement after reconstruction (prunekit.refine): none or dsnot
    refine_params: Any = None  # its parameters (e.g. refine/dsnot.py's DSnoTParams), None: its defaults
    permute: bool = False  # N:M only: reorder each layer's input channels before forming groups of M
    target: Target = field(default_factory=Target)
    seed: int = 0
    method: str | None = None
    unreached: Literal["magnitude", "dense"] = "magnitude"

    def __post_init__(self) -> None:
        # Names are checked against the registries when a recipe is resolved (prunekit.resolve).
        if self.unreached not in ("magnitude", "dense"):
            raise ConfigError(f"unreached={self.unreached!r}: layers no calibration token reaches (unused MoE "
                              "experts) are pruned by 'magnitude' or left 'dense'")
        if not isinstance(self.sparsity, (int, float)) or math.isnan(self.sparsity):
            raise ConfigError(f"sparsity must be a number in [0, 1), got {self.sparsity!r}")
        if not (0.0 <= self.sparsity < 1.0):
            raise ConfigError(
                f"sparsity {self.sparsity} is outside [0, 1): it is the fraction of weights removed, "
                "e.g. 0.5 for half"
            )
        if not isinstance(self.permute, bool):
            raise ConfigError(f"permute takes true or false, got {self.permute!r}")
        if self.permute and self.pattern.kind != "nm":
            raise ConfigError(f"permute reorders input channels to form better groups of an N:M pattern; "
                              f"pattern {self.pattern} has no groups: use --pattern 2:4 (or N:M) or drop --permute")
        implied = self.pattern.sparsity
        if implied is not None:
            if abs(self.sparsity - implied) > 1e-9:
                raise ConfigError(
                    f"pattern {self.pattern} removes exactly {implied:g} of every layer, "
                    f"but sparsity {self.sparsity:g} was asked for; drop --sparsity or set it to {implied:g}"
                )
            if self.allocation.name != "uniform":
                raise ConfigError(
                    f"allocation {self.allocation.name!r} varies sparsity per layer, which an N:M pattern "
                    "fixes; use --allocation uniform with N:M"
                )

    @classmethod
    def from_method(
        cls, method: str, *, sparsity: float | None = None, pattern: str | Pattern = "unstructured", **kw: Any
    ) -> PruneConfig:
        """Build a config from a method preset (``magnitude``, ``random``, ``wanda``, ``sparsegpt``)."""
        score, reconstruction = METHODS.get(method)
        pat = Pattern.parse(pattern)
        if sparsity is None:
            sparsity = pat.sparsity if pat.sparsity is not None else 0.5
        return cls(score=score, reconstruction=reconstruction, sparsity=sparsity, pattern=pat, method=method, **kw)

    # -- serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["pattern"] = str(self.pattern)
        d["target"]["ignore"] = list(self.target.ignore)
        d["allocation"] = {"name": self.allocation.name, **dict(self.allocation.params)}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PruneConfig:
        d = dict(d)
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown recipe keys {sorted(unknown)}; known: {[f.name for f in fields(cls)]}")
        if "pattern" in d:
            d["pattern"] = Pattern.parse(d["pattern"])
        alloc = d.get("allocation")
        if isinstance(alloc, dict):  # {name, params...}, or the older {name, owl_m, owl_lambda}
            a = {k: v for k, v in alloc.items() if v is not None}
            legacy = {"owl_m": "m", "owl_lambda": "lambda"}
            params = {legacy.get(k, k): v for k, v in a.items() if k not in ("name", "params")}
            params.update(dict(a.get("params") or {}))
            d["allocation"] = Allocation(a.get("name", "uniform"), params=tuple(params.items()))
        if isinstance(d.get("sparsegpt"), dict):
            from .reconstruct.sparsegpt import SparseGPTParams  # the older recipe format named its fields

            d["sparsegpt"] = SparseGPTParams(**d["sparsegpt"])
        if isinstance(d.get("refine_params"), dict):
            from .refine import REFINEMENTS

            params = REFINEMENTS.params_of(d.get("refine", "none"))
            if params is None:
                raise ConfigError(f"refinement {d.get('refine', 'none')!r} takes no parameters; remove refine_params")
            d["refine_params"] = params(**d["refine_params"])
        for f in fields(cls):
            sub = d.get(f.name)
            if isinstance(sub, dict) and f.name != "pattern":
                sub_cls = type(getattr(cls(), f.name)) if f.name != "pattern" else Pattern
                if not is_dataclass(sub_cls):
                    raise ConfigError(f"recipe key {f.name!r} takes a value, not a mapping")
                known = {g.name for g in fields(sub_cls)}
                if set(sub) - known:
                    raise ConfigError(f"unknown keys {sorted(set(sub) - known)} under {f.name!r}; known: {sorted(known)}")
                if "ignore" in sub:
                    sub = {**sub, "ignore": tuple(sub["ignore"])}
                d[f.name] = sub_cls(**sub)
        return cls(**d)

    def to_yaml(self) -> str:
        return yaml.safe_dump({"prunekit_recipe": self.to_dict()}, sort_keys=False)

    @classmethod
    def from_yaml(cls, source: str | Path) -> PruneConfig:
        """Read a recipe from a YAML file path or from YAML text."""
        is_file = isinstance(source, Path) or ("\n" not in source and Path(source).is_file())
        if isinstance(source, Path) and not source.is_file():
            raise ConfigError(f"recipe file {source} does not exist")
        text = Path(source).read_text(encoding="utf-8") if is_file else str(source)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"recipe is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError("recipe must be a YAML mapping")
        if "stages" in data:  # a staged recipe: its one weights stage
            from .recipe import Recipe

            stages = [s for s in Recipe.from_dict(data).stages if isinstance(s, cls)]
            if len(stages) != 1:
                raise ConfigError(f"this recipe has {len(stages)} weights stages; read it with prunekit.Recipe.from_yaml")
            return stages[0]
        return cls.from_dict(data.get("prunekit_recipe", data))


def __getattr__(name: str) -> Any:
    # SparseGPTParams lives with SparseGPT (reconstruct/sparsegpt.py); this is its older address.
    if name == "SparseGPTParams":
        from .reconstruct.sparsegpt import SparseGPTParams

        return SparseGPTParams
    raise AttributeError(name)

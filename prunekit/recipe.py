"""Recipes: an ordered list of typed stages sharing one calibration section, YAML in and out.

    calibration: {text: default, nsamples: 32, seqlen: 512, seed: 0}
    stages:
      - structure: {structure: neurons, ratio: 0.2, method: flap}
      - weights: {method: sparsegpt, sparsity: 0.5, pattern: "2:4"}

Each stage is one of today's configs: ``weights`` (:class:`~prunekit.config.PruneConfig`),
``structure`` (:class:`~prunekit.structural.StructureConfig`), ``training`` (gradual pruning
while fine-tuning on the calibration text) and ``recovery`` (fine-tuning biases and norms or
masked LoRA with the masks kept). Everything is validated when the recipe is read, before a
model is loaded, and every error names the stage, the key and the fix.
"""
from __future__ import annotations

import dataclasses

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from .config import Allocation, Calibration, Pattern, PruneConfig, Target
from .errors import ConfigError
from .stages import RecoveryStage, TrainingStage



@dataclass(frozen=True)
class CalibrationSpec:
    """The calibration section every stage shares: ``nsamples`` windows of ``seqlen`` tokens of
    ``text`` drawn with ``seed``, run ``batch_size`` windows at a time, in ``sequential`` order,
    hidden states waiting between blocks per ``offload``."""

    text: str = "default"
    nsamples: int = 32
    seqlen: int = 512
    seed: int = 0
    batch_size: int | None = 4
    sequential: str = "layer"
    offload: str = "none"

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text:
            raise ConfigError(f"calibration: text must be a text spec (a file, 'default' or a hub name), got {self.text!r}")
        self.as_calibration()  # the ranges and names are checked there

    def as_calibration(self) -> Calibration:
        return Calibration(self.nsamples, self.seqlen, self.batch_size, self.seed, self.sequential, self.offload)


@dataclass(frozen=True)
class Recipe:
    """An ordered list of stages run on one model with one calibration set."""

    stages: tuple[Any, ...]
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError("recipe: 'stages' is empty; give at least one stage, e.g. - weights: {method: wanda}")
        object.__setattr__(self, "stages", _fit_nm(tuple(self.stages)))
        from .resolve import check

        for i, stage in enumerate(self.stages):  # every name resolves before anything is loaded
            try:
                check(stage)
            except ConfigError as exc:
                where = f"stage {i + 1} ({stage_kind(stage)})"
                raise ConfigError(str(exc) if str(exc).startswith("stage ") else f"{where}: {exc}") from None
        seen_nm = None
        for i, stage in enumerate(self.stages):
            kind = stage_kind(stage)
            if kind == "weights" and stage.pattern.kind == "nm":
                seen_nm = (i, stage.pattern)
            if kind in ("structure", "budget") and seen_nm is not None:
                raise ConfigError(
                    f"stage {i + 1} ({kind}) comes after stage {seen_nm[0] + 1} (weights, {seen_nm[1]}): removing "
                    "units would break the N:M groups along the inputs; put the structure stage first")
            if kind == "tokens" and i != len(self.stages) - 1:
                raise ConfigError(
                    f"stage {i + 1} (tokens) must be the last stage, and the only tokens stage: it changes how the "
                    "finished model runs at inference (hooks), not its weights, so every stage that changes weights "
                    "goes before it")

    @property
    def needs_data(self) -> bool:
        return any(stage_needs_data(s) for s in self.stages)

    # -- serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        c = self.calibration
        return {"calibration": {f.name: getattr(c, f.name) for f in fields(c)},
                "stages": [{stage_kind(s): stage_to_dict(s)} for s in self.stages]}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, d: Any) -> Recipe:
        if not isinstance(d, dict):
            raise ConfigError("a recipe is a mapping with 'stages' (and optionally 'calibration')")
        if "prunekit_recipe" in d or "structural" in d:  # a result saved before recipes had stages
            return legacy_recipe(d)
        unknown = set(d) - {"calibration", "stages"}
        if unknown:
            raise ConfigError(f"recipe: unknown top-level keys {sorted(unknown)}; use 'calibration' and 'stages'")
        cal = d.get("calibration") or {}
        if not isinstance(cal, dict):
            raise ConfigError("recipe: 'calibration' must be a mapping, e.g. {text: default, nsamples: 32}")
        known = {f.name for f in fields(CalibrationSpec)}
        if set(cal) - known:
            raise ConfigError(f"calibration: unknown keys {sorted(set(cal) - known)}; known: {sorted(known)}")
        spec = _build("calibration", CalibrationSpec, cal)
        stages = d.get("stages")
        if not isinstance(stages, list):
            raise ConfigError("recipe: 'stages' must be a list, e.g. [{weights: {method: wanda, sparsity: 0.5}}]")
        return cls(tuple(parse_stage(i, s, spec) for i, s in enumerate(stages)), spec)

    @classmethod
    def from_yaml(cls, source: str | Path) -> Recipe:
        """Read a recipe from a YAML file or YAML text."""
        text = _read(source)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"recipe is not valid YAML: {exc}") from None
        return cls.from_dict(data)


def _fit_nm(stages: tuple[Any, ...]) -> tuple[Any, ...]:
    """A structure stage that removes input columns (neurons, channels, width) before an N:M
    weights stage keeps a multiple of M units per group, so every N:M group still fits."""
    out = list(stages)
    for i, stage in enumerate(out):
        if stage_kind(stage) != "structure" or stage.structure not in ("neurons", "channels", "width"):
            continue
        ms = [s.pattern.m for s in out[i + 1:] if stage_kind(s) == "weights" and s.pattern.kind == "nm"]
        if ms:
            step = math.lcm(stage.round_to, *ms)
            if step != stage.round_to:
                out[i] = replace(stage, round_to=step)
    return tuple(out)


def _read(source: str | Path) -> str:
    if isinstance(source, Path) or ("\n" not in str(source) and str(source).endswith((".yaml", ".yml"))):
        path = Path(source)
        if path.is_dir():
            raise ConfigError(f"recipe {path} is a directory; pass its prunekit_recipe.yaml or a YAML file")
        if not path.exists():
            raise ConfigError(f"recipe file {path} does not exist")
        return path.read_text(encoding="utf-8")  # a file, or a pipe such as /dev/stdin
    return str(source)


def _build(where: str, cls: type, kwargs: dict[str, Any]) -> Any:
    """``cls(**kwargs)`` with errors that name ``where``."""
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        text = str(exc)
        kind = where.split("(")[-1].rstrip(")")
        text = text[len(kind) + 2:] if text.startswith(kind + ": ") else text
        raise ConfigError(text if text.startswith(where) else f"{where}: {text}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


# -- stages ------------------------------------------------------------------------------
STAGE_KINDS = ("structure", "budget", "weights", "training", "recovery", "tokens")
_WEIGHTS_KEYS = {"method", "score", "reconstruction", "sparsity", "pattern", "allocation", "sparsegpt", "ignore",
                 "unreached", "seed", "refine", "refine_params", "permute"}


def stage_kind(stage: Any) -> str:
    from .structural import StructureConfig

    if isinstance(stage, PruneConfig):
        return "weights"
    if isinstance(stage, StructureConfig):
        return "structure"
    if isinstance(stage, TrainingStage):
        return "training"
    if isinstance(stage, RecoveryStage):
        return "recovery"
    from .structural.budget import BudgetStage

    if isinstance(stage, BudgetStage):
        return "budget"
    from .tokens.config import TokenStage

    if isinstance(stage, TokenStage):
        return "tokens"
    raise ConfigError(f"not a recipe stage: {type(stage).__name__}")


def stage_needs_data(stage: Any) -> bool:
    kind = stage_kind(stage)
    if kind == "weights":
        from .resolve import needs_data

        return needs_data(stage)
    return True  # structure stages trace one calibration batch even with data-free scores; training trains


def parse_stage(i: int, item: Any, spec: CalibrationSpec) -> Any:
    """One ``{kind: {key: value}}`` item of ``stages`` -> its typed config."""
    if not isinstance(item, dict) or len(item) != 1:
        raise ConfigError(f"stage {i + 1}: write each stage as one mapping {{kind: {{...}}}} with kind one of "
                          f"{', '.join(STAGE_KINDS)}; got {item!r}")
    (kind, body), = item.items()
    where = f"stage {i + 1} ({kind})"
    if kind not in STAGE_KINDS:
        raise ConfigError(f"stage {i + 1}: unknown stage kind {kind!r}; use one of {', '.join(STAGE_KINDS)}")
    body = dict(body or {})
    if kind == "weights":
        return _weights(where, body, spec)
    if kind == "structure":
        return _structure(where, body, spec)
    if kind == "budget":
        from .structural.budget import BudgetStage

        body.setdefault("seed", spec.seed)
        cls: type = BudgetStage
    elif kind == "tokens":
        from .tokens.config import TokenStage

        cls = TokenStage
    else:
        cls = TrainingStage if kind == "training" else RecoveryStage
    known = {f.name for f in fields(cls)}
    if set(body) - known:
        raise ConfigError(f"{where}: unknown keys {sorted(set(body) - known)}; known: {sorted(known)}")
    return _build(where, cls, body)


def _weights(where: str, body: dict[str, Any], spec: CalibrationSpec) -> PruneConfig:
    if set(body) - _WEIGHTS_KEYS:
        raise ConfigError(f"{where}: unknown keys {sorted(set(body) - _WEIGHTS_KEYS)}; known: {sorted(_WEIGHTS_KEYS)}")
    kw: dict[str, Any] = {"calibration": spec.as_calibration(), "seed": body.get("seed", spec.seed)}
    try:
        pattern = Pattern.parse(body.get("pattern", "unstructured"))
        alloc = body.get("allocation", "uniform")
        if isinstance(alloc, dict):
            a = dict(alloc)
            kw["allocation"] = Allocation(str(a.pop("name", "uniform")), params=tuple(a.items()))
        else:
            kw["allocation"] = Allocation(str(alloc))
        if "sparsegpt" in body:
            from .reconstruct.sparsegpt import SparseGPTParams

            kw["sparsegpt"] = SparseGPTParams(**dict(body["sparsegpt"]))
        if "refine" in body or "refine_params" in body:
            kw.update(refine_fields(str(body.get("refine", "none")), body.get("refine_params")))
        if "ignore" in body:
            ignore = body["ignore"]
            kw["target"] = Target(tuple([ignore] if isinstance(ignore, str) else ignore))
        if "unreached" in body:
            kw["unreached"] = body["unreached"]
        if "permute" in body:
            kw["permute"] = body["permute"]
        if "method" in body:
            if "score" in body or "reconstruction" in body:
                raise ConfigError("give a method preset or score/reconstruction, not both")
            return PruneConfig.from_method(body["method"], sparsity=body.get("sparsity"), pattern=pattern, **kw)
        sparsity = body.get("sparsity", pattern.sparsity if pattern.sparsity is not None else 0.5)
        return PruneConfig(score=body.get("score", "wanda"), reconstruction=body.get("reconstruction", "none"),
                           sparsity=sparsity, pattern=pattern, **kw)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def refine_fields(refine: str, params: Any) -> dict[str, Any]:
    """``refine`` and ``refine_params`` of a weights stage, the parameters built by the
    refinement's own parameter class (``{max_cycles: 50, ...}`` for dsnot)."""
    from .refine import REFINEMENTS

    cls = REFINEMENTS.params_of(refine)
    if params is None:
        return {"refine": refine}
    if cls is None:
        raise ConfigError(f"refinement {refine!r} takes no parameters; remove refine_params")
    if not isinstance(params, dict):
        raise ConfigError(f"refine_params takes a mapping of {cls.__name__}'s fields, got {params!r}")
    return {"refine": refine, "refine_params": cls(**params)}


def _structure(where: str, body: dict[str, Any], spec: CalibrationSpec) -> Any:
    from .structural import StructureConfig

    shared = {"nsamples", "seqlen", "batch_size"}
    if shared & set(body):
        raise ConfigError(f"{where}: {sorted(shared & set(body))} belong in the recipe's calibration section")
    known = {f.name for f in fields(StructureConfig)} - shared - {"extra"}
    if set(body) - known:
        raise ConfigError(f"{where}: unknown keys {sorted(set(body) - known)}; known: {sorted(known)}")
    body.setdefault("seed", spec.seed)
    if "overrides" in body:
        body["overrides"] = tuple(tuple(o) for o in body["overrides"])
    if "ignore" in body:
        body["ignore"] = tuple([body["ignore"]] if isinstance(body["ignore"], str) else body["ignore"])
    return _build(where, StructureConfig, {**body, "nsamples": spec.nsamples, "seqlen": spec.seqlen,
                                           "batch_size": spec.batch_size or spec.nsamples})


def stage_to_dict(stage: Any) -> dict[str, Any]:
    kind = stage_kind(stage)
    if kind == "weights":
        c = stage
        out: dict[str, Any] = {"method": c.method} if c.method else {"score": c.score, "reconstruction": c.reconstruction}
        out.update(sparsity=c.sparsity, pattern=str(c.pattern))
        out["allocation"] = c.allocation.to_dict()
        if c.sparsegpt is not None:
            out["sparsegpt"] = {"blocksize": c.sparsegpt.blocksize, "damp": c.sparsegpt.damp}
        if c.permute:
            out["permute"] = True
        if c.refine != "none":
            out["refine"] = c.refine
            if c.refine_params is not None:
                out["refine_params"] = dataclasses.asdict(c.refine_params)
        if c.target.ignore:
            out["ignore"] = list(c.target.ignore)
        out.update(unreached=c.unreached, seed=c.seed)
        return out
    if kind == "structure":
        d = dict(stage.to_dict()["structural"])
        for k in ("nsamples", "seqlen", "batch_size"):
            d.pop(k)
        return d
    if kind in ("budget", "recovery"):
        return stage.to_dict()
    if kind == "tokens":
        return {f.name: list(v) if isinstance(v, tuple) else v
                for f in fields(stage) if (v := getattr(stage, f.name)) is not None}
    return {f.name: getattr(stage, f.name) for f in fields(stage)}


def legacy_recipe(d: dict[str, Any]) -> Recipe:
    """A recipe from a result saved before stages existed (one weights or structure config)."""
    if "structural" in d:
        from .structural import StructureConfig

        c = StructureConfig.from_dict(d)
        spec = CalibrationSpec(nsamples=c.nsamples, seqlen=c.seqlen, seed=c.seed, batch_size=c.batch_size)
        return Recipe((c,), spec)
    c = PruneConfig.from_dict(d["prunekit_recipe"])
    cal = c.calibration
    spec = CalibrationSpec(nsamples=cal.nsamples, seqlen=cal.seqlen, seed=cal.seed, batch_size=cal.batch_size,
                           sequential=cal.sequential, offload=cal.offload)
    return Recipe((replace(c),), spec)


def one_stage(stage: Any, calibration: CalibrationSpec | None = None) -> Recipe:
    """The recipe of a single stage (``prunekit prune`` and the one-stage Python API)."""
    if calibration is None:
        kind = stage_kind(stage)
        if kind == "weights":
            cal = stage.calibration
            calibration = CalibrationSpec(nsamples=cal.nsamples, seqlen=cal.seqlen, seed=cal.seed,
                                          batch_size=cal.batch_size, sequential=cal.sequential, offload=cal.offload)
        elif kind == "structure":
            calibration = CalibrationSpec(nsamples=stage.nsamples, seqlen=stage.seqlen, seed=stage.seed,
                                          batch_size=stage.batch_size)
        else:
            calibration = CalibrationSpec()
    return Recipe((stage,), calibration)


__all__ = ["Recipe", "CalibrationSpec", "STAGE_KINDS", "parse_stage", "stage_kind", "one_stage",
           "legacy_recipe"]

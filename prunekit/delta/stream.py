"""Prune a fine-tune's delta, or merge several fine-tunes, streaming tensor by tensor.

Every tensor is read from each checkpoint, processed and written before the next is read,
so peak memory is a few tensors (the largest one, times the number of models, in float64
for float32 models) whatever the size of the models. The output is a standard Hugging Face
directory (the fine-tune's or the base's config, tokenizer and shard layout; weights in
safetensors) that plain ``from_pretrained`` loads, or with ``compact`` only the sparse delta
(:mod:`prunekit.delta.compact`). Either is written atomically; every check (ranges, method,
same architecture, output location) runs before anything is written.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..atomic import write_dir_atomically
from ..errors import ConfigError, ModelLoadError
from .checkpoint import INDEX, NAMES, Checkpoint, SafetensorsWriter, TensorSpec, open_checkpoint
from .ops import (DAREX_NEEDS_Q, DELTA_METHODS, MERGE_METHODS, MERGE_TRIM, DeltaParams, MergeParams, chunks,
                  default_weights, delta32, generator_for, patch, working_dtype)

log = logging.getLogger(__name__)

REPORT_FILE = "prunekit_delta.json"
#: files of a model directory that hold weights (never copied beside the new ones)
WEIGHT_FILES = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|gguf|msgpack|h5|body)$|.*\.index\.json$")
#: the tensors of the decoder (or encoder) blocks: ``model.layers.3.``, ``transformer.h.3.`` ...
BLOCK_TENSOR = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.\d+\.")


@dataclass(frozen=True)
class Selection:
    """Which tensors lose delta entries. Default: every 2-D floating weight inside the blocks
    (embeddings, the LM head, norms and biases keep their whole delta). ``include``: a regex
    over tensor names that replaces the default rule; ``exclude``: a regex removed from it."""

    include: str | None = None
    exclude: str | None = None

    def __post_init__(self) -> None:
        for key in ("include", "exclude"):
            value = getattr(self, key)
            try:
                if value is not None:
                    re.compile(value)
            except re.error as exc:
                raise ConfigError(f"--{key} {value!r} is not a valid regular expression ({exc})") from None

    def __call__(self, name: str, spec: TensorSpec) -> bool:
        if not spec.dtype.is_floating_point or (self.exclude and re.search(self.exclude, name)):
            return False
        if self.include is not None:
            return re.search(self.include, name) is not None
        return len(spec.shape) == 2 and name.endswith("weight") and BLOCK_TENSOR.search(name) is not None


@dataclass(frozen=True)
class DeltaConfig:
    """One fine-tune's delta pruning: ``method`` (a delta method: dare, darex, drop,
    magnitude, ties), its ``drop`` rate and ``q`` (darex), ``seed`` of the random drops,
    and which ``tensors``."""

    method: str = "dare"
    drop: float = 0.9
    q: float | None = None
    seed: int = 0
    tensors: Selection = field(default_factory=Selection)

    def __post_init__(self) -> None:
        DELTA_METHODS.get(self.method)  # unknown names fail here, listing the known ones
        DeltaParams(self.drop, self.q)
        if self.q is not None and self.method != "darex":
            raise ConfigError(f"q goes with method darex, not {self.method}")
        if self.method == "darex" and self.q is None:
            raise ConfigError(DAREX_NEEDS_Q)


@dataclass(frozen=True)
class MergeConfig:
    """Merging fine-tunes of one base: ``method`` (task_arithmetic, ties, dare_ties), one
    weight per fine-tune (default: :func:`default_weights`), the ``drop`` each delta is
    trimmed by (default 0.8 for ties as in TIES's k = 20%, 0.9 for dare_ties, 0 for
    task_arithmetic), ``scale`` λ of the merged delta, ``seed``, and which ``tensors`` are
    trimmed (the others are merged by the same method with nothing dropped)."""

    method: str = "ties"
    weights: tuple[float, ...] | None = None
    drop: float | None = None
    scale: float = 1.0
    seed: int = 0
    tensors: Selection = field(default_factory=Selection)

    def __post_init__(self) -> None:
        MERGE_METHODS.get(self.method)
        if self.drop is None:
            object.__setattr__(self, "drop", {"ties": 0.8, "dare_ties": 0.9}.get(self.method, 0.0))
        MergeParams(self.drop, self.scale)
        if MERGE_TRIM[self.method] is None and self.drop:
            raise ConfigError(f"{self.method} drops nothing (got drop {self.drop}); use ties or dare_ties to trim "
                              "the deltas first, or drop 0")


@dataclass
class DeltaResult:
    """What a delta run or a merge did: ``report`` (the ``--json`` object), the ``output``
    directory, and ``state_dict`` when no output directory was given."""

    report: dict[str, Any]
    output: Path | None = None
    state_dict: dict[str, Tensor] | None = None


class TensorHasher:
    """A checksum of a model's tensors (names, dtypes, shapes and bytes, in name order), the
    same whatever the file layout; per-tensor digests let a wrong base be named early."""

    def __init__(self) -> None:
        self.digests: dict[str, str] = {}

    @staticmethod
    def digest(name: str, tensor: Tensor) -> str:
        h = hashlib.sha256(f"{name}|{NAMES[tensor.dtype]}|{list(tensor.shape)}|".encode())
        flat = tensor.contiguous().reshape(-1)
        if flat.numel():
            h.update(memoryview(flat.view(torch.uint8).numpy()))
        return h.hexdigest()

    def add(self, name: str, tensor: Tensor) -> str:
        self.digests[name] = d = self.digest(name, tensor)
        return d

    def hexdigest(self) -> str:
        return hashlib.sha256("".join(f"{n}:{self.digests[n]}\n" for n in sorted(self.digests)).encode()).hexdigest()


def _architecture(ckpt: Checkpoint) -> tuple[str, ...] | None:
    config = Path(ckpt.source) / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    return (str(data.get("model_type")), *(data.get("architectures") or ()))


def check_compatible(base: Checkpoint, others: Sequence[Checkpoint]) -> None:
    """Same tensor names and shapes (and config architecture, when both have one), or an
    error naming the first tensor that differs."""
    names = base.names()
    for other in others:
        arch_a, arch_b = _architecture(base), _architecture(other)
        if arch_a and arch_b and arch_a[0] != arch_b[0]:
            raise ModelLoadError(f"{other.source} is a {arch_b[0]} model, its base {base.source} a {arch_a[0]}: "
                                 "deltas need fine-tunes of the same architecture as the base")
        theirs = set(other.names())
        for name in names:
            if name not in theirs:
                raise ModelLoadError(f"tensor {name!r} of the base {base.source} is missing from {other.source}: "
                                     "deltas need the same architecture (same tensor names and shapes)")
            a, b = base.spec(name), other.spec(name)
            if a.shape != b.shape:
                raise ModelLoadError(f"tensor {name!r} has shape {list(b.shape)} in {other.source} but "
                                     f"{list(a.shape)} in the base {base.source}: deltas need the same architecture")
        extra = sorted(theirs - set(names))
        if extra:
            raise ModelLoadError(f"tensor {extra[0]!r} of {other.source} is not in the base {base.source} "
                                 f"({len(extra)} such tensors): deltas need the same architecture")


def ordered_names(template: Checkpoint) -> dict[str, list[str]]:
    """Tensor names grouped by the shard of ``template`` they live in, in file order."""
    groups: dict[str, list[str]] = {}
    for name in template.names():
        groups.setdefault(template.shard_of(name), []).append(name)
    return groups


class DenseSink:
    """Writes a Hugging Face weights layout (one file, or shards plus their index)."""

    def __init__(self, directory: Path, groups: Mapping[str, list[str]], specs: Mapping[str, TensorSpec]) -> None:
        self.directory, self.groups, self.specs = directory, groups, specs
        self._open: SafetensorsWriter | None = None

    def write(self, shard: str, name: str, out: Tensor, mask: Tensor) -> None:
        if self._open is None or self._open.path.name != shard:
            if self._open is not None:
                self._open.close()
            self._open = SafetensorsWriter(self.directory / shard, {n: self.specs[n] for n in self.groups[shard]})
        self._open.write(name, out)

    def close(self) -> dict[str, Any]:
        if self._open is not None:
            self._open.close()
        if len(self.groups) > 1:
            total = sum(s.nbytes for s in self.specs.values())
            index = {"metadata": {"total_size": total},
                     "weight_map": {n: shard for shard, names in self.groups.items() for n in names}}
            (self.directory / INDEX).write_text(json.dumps(index, indent=2))
        return {}


class DictSink:
    """Collects the output in memory (state-dict inputs without an output directory)."""

    def __init__(self) -> None:
        self.state_dict: dict[str, Tensor] = {}

    def write(self, shard: str, name: str, out: Tensor, mask: Tensor) -> None:
        self.state_dict[name] = out

    def close(self) -> dict[str, Any]:
        return {}


def copy_side_files(source: str, directory: Path) -> None:
    """Config, tokenizer, generation config ...: every top-level non-weight file."""
    src = Path(source)
    if src.is_dir():
        for f in src.iterdir():
            if f.is_file() and not WEIGHT_FILES.fullmatch(f.name) and f.name != REPORT_FILE:
                shutil.copy2(f, directory / f.name)


def bytes_in(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def run_streamed(step: Callable[[str, str], tuple[Tensor, Tensor, dict]], groups: Mapping[str, list[str]],
                 sink: Any, *, desc: str, progress: bool) -> dict[str, dict]:
    """Call ``step(shard, name) -> (out, mask, stats)`` for every tensor, in layout order,
    writing each result before the next tensor is read."""
    stats: dict[str, dict] = {}
    total = sum(len(v) for v in groups.values())
    with tqdm(total=total, desc=desc, unit="tensor", disable=not progress) as bar:
        for shard, names in groups.items():
            for name in names:
                out, mask, stats[name] = step(shard, name)
                sink.write(shard, name, out, mask)
                bar.update()
    return stats


def summarise(stats: Mapping[str, dict], started: float) -> dict[str, Any]:
    """Overall fractions over the pruned tensors, and the run's resources."""
    from ..evaluate.resources import peak_rss_mb

    pruned = [s for s in stats.values() if s["pruned"]]
    numel = sum(s["numel"] for s in pruned)
    return {"tensors_pruned": len(pruned), "tensors_total": len(stats), "params_pruned": numel,
            "params_total": sum(s["numel"] for s in stats.values()),
            "kept_fraction": sum(s["kept"] for s in pruned) / numel if numel else 1.0,
            "changed_fraction": sum(s["changed"] for s in pruned) / numel if numel else 1.0,
            "seconds": time.perf_counter() - started, "peak_memory_mb": peak_rss_mb(),
            "largest_tensor_mb": max((s["bytes"] for s in stats.values()), default=0) / 2**20}


def _finish(write: Callable[..., dict], output: str | Path | None, overwrite: bool,
            report: dict[str, Any]) -> DeltaResult:
    """Run ``write(directory, sink)`` into an atomic directory (or into memory when there is
    no output) and complete the report: ``bytes_written`` counts every file but the report."""
    if output is None:
        sink = DictSink()
        report.update(write(None, sink))
        return DeltaResult(report, None, sink.state_dict)
    from ..export.save import check_output

    out = check_output(output, overwrite)

    def into(tmp: Path) -> None:
        report.update(write(tmp, None))
        report.update(output=str(out), bytes_written=bytes_in(tmp))
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=1, default=str))

    write_dir_atomically(out, into, replace=overwrite)
    return DeltaResult(report, out, None)


def _delta_step(base: Checkpoint, ft: Checkpoint, config: DeltaConfig, hasher: TensorHasher):
    fn, params = DELTA_METHODS.get(config.method), DeltaParams(config.drop, config.q)

    def step(shard: str, name: str) -> tuple[Tensor, Tensor, dict]:
        b, f = base.read(name), ft.read(name)
        hasher.add(name, b)
        target = config.tensors(name, base.spec(name))
        if target:
            keep, scale = fn(delta32(b, f), params, generator_for(config.seed, name))
        else:
            keep, scale = torch.ones(b.shape, dtype=torch.bool), 1.0
        out, mask = patch(b, f, keep, scale)
        return out, mask, {"numel": b.numel(), "kept": int(keep.sum()), "changed": int(mask.sum()),
                           "pruned": target, "bytes": b.numel() * b.element_size()}

    return step


def prune_delta(base: Any, finetuned: Any, config: DeltaConfig | None = None, *, output: str | Path | None = None,
                compact: bool = False, overwrite: bool = False, progress: bool = True, **fields: Any) -> DeltaResult:
    """Prune the delta between ``finetuned`` and ``base`` (directories, hub ids, safetensors
    files or state dicts) and write base + pruned delta to ``output`` as a Hugging Face
    directory, or with ``compact`` only the sparse delta (apply it with
    :func:`prunekit.delta.apply_delta`). Without ``output`` (state-dict use) the pruned
    state dict comes back in the result. ``fields``: :class:`DeltaConfig` fields, as a
    shortcut (``prune_delta(b, f, method="dare", drop=0.9)``)."""
    from .compact import CompactSink

    config = config or DeltaConfig(**fields)
    if compact and output is None:
        raise ConfigError("a compact delta is written to a directory; give output=DIR")
    b, f = open_checkpoint(base), open_checkpoint(finetuned)
    check_compatible(b, [f])
    groups = ordered_names(f)
    hasher = TensorHasher()
    report: dict[str, Any] = {"command": "delta", "method": config.method, "drop": config.drop, "q": config.q,
                              "seed": config.seed, "base": b.source, "finetuned": f.source,
                              "format": "compact" if compact else "dense"}
    started = time.perf_counter()

    def write(tmp: Path | None, sink: Any = None) -> dict:
        if sink is None:
            specs = {n: b.spec(n) for n in b.names()}
            sink = CompactSink(tmp, specs, groups) if compact else DenseSink(tmp, groups, specs)
            copy_side_files(f.source, tmp)
        stats = run_streamed(_delta_step(b, f, config, hasher), groups, sink, desc=f"delta {config.method}",
                             progress=progress)
        extra = sink.close()
        return {**summarise(stats, started), "base_sha256": hasher.hexdigest(), **extra,
                "base_tensor_sha256": hasher.digests if compact else None, "per_tensor": stats}

    result = _finish(write, output, overwrite, report)
    if not compact:
        result.report.pop("base_tensor_sha256", None)
    log.info("delta %s drop %.2f: kept %.2f%% of %d pruned tensors' entries", config.method, config.drop,
             100 * result.report["kept_fraction"], result.report["tensors_pruned"])
    return result


def _merge_step(base: Checkpoint, fts: Sequence[Checkpoint], config: MergeConfig, weights: Tensor):
    fn, trim = MERGE_METHODS.get(config.method), MERGE_TRIM[config.method]

    def step(shard: str, name: str) -> tuple[Tensor, Tensor, dict]:
        b = base.read(name)
        target = config.tensors(name, base.spec(name))
        stats = {"numel": b.numel(), "pruned": target, "bytes": b.numel() * b.element_size()}
        if not b.dtype.is_floating_point:
            return b, torch.zeros(b.shape, dtype=torch.bool), {**stats, "kept": b.numel(), "changed": 0}
        params = DeltaParams(config.drop if target else 0.0)
        tensors, keeps, scales = [], [], []
        for i, ft in enumerate(fts):
            f = ft.read(name)
            keep, scale = None, 1.0
            if trim is not None and params.drop > 0:  # trims rank or draw over the whole tensor
                keep, scale = DELTA_METHODS.get(trim)(delta32(b, f), params, generator_for(config.seed, f"{name}#{i}"))
                keep = keep.reshape(-1)
            tensors.append(f.reshape(-1))
            keeps.append(keep)
            scales.append(scale)
        wd = working_dtype(b.dtype)
        w = weights.to(wd)
        out = b.clone()
        mask = torch.zeros(b.shape, dtype=torch.bool)
        flat_b, flat_out, flat_mask = b.reshape(-1), out.reshape(-1), mask.reshape(-1)
        for s in chunks(b.numel()):  # the elementwise merge, in small float64 pieces
            bw = flat_b[s].to(wd)
            deltas = torch.stack([(f[s].to(wd) - bw) * (1.0 if k is None else k[s] * c)
                                  for f, k, c in zip(tensors, keeps, scales)])  # (k, c)
            merged = fn(deltas, w) * config.scale  # (c,)
            m = merged != 0
            flat_mask[s] = m
            flat_out[s][m] = (bw[m] + merged[m]).to(b.dtype)
        changed = int(mask.sum())  # entries whose merged delta survived
        return out, mask, {**stats, "kept": changed, "changed": changed}

    return step


def merge(base: Any, finetuned: Sequence[Any], config: MergeConfig | None = None, *,
          output: str | Path | None = None, overwrite: bool = False, progress: bool = True,
          **fields: Any) -> DeltaResult:
    """Merge fine-tunes of ``base`` into one model: ``base + λ · merge(deltas)``, written as
    a Hugging Face directory with the base's config, tokenizer and shard layout (or returned
    as a state dict without ``output``). ``fields``: :class:`MergeConfig` fields."""
    config = config or MergeConfig(**fields)
    if len(finetuned) < 1:
        raise ConfigError("merge needs at least one fine-tuned model besides the base")
    weights = config.weights or tuple(default_weights(config.method, len(finetuned)))
    if len(weights) != len(finetuned):
        raise ConfigError(f"{len(weights)} weights for {len(finetuned)} fine-tuned models; give one weight per model")
    if any(w < 0 for w in weights) or sum(weights) == 0:
        raise ConfigError(f"weights {list(weights)} must be non-negative and not all zero")
    b = open_checkpoint(base)
    fts = [open_checkpoint(f) for f in finetuned]
    check_compatible(b, fts)
    groups = ordered_names(b)
    report: dict[str, Any] = {"command": "merge", "method": config.method, "weights": list(weights),
                              "drop": config.drop, "scale": config.scale, "seed": config.seed, "base": b.source,
                              "finetuned": [f.source for f in fts], "format": "dense"}
    started = time.perf_counter()
    step = _merge_step(b, fts, config, torch.tensor(weights, dtype=torch.float64))

    def write(tmp: Path | None, sink: Any = None) -> dict:
        if sink is None:
            sink = DenseSink(tmp, groups, {n: b.spec(n) for n in b.names()})
            copy_side_files(b.source, tmp)
        stats = run_streamed(step, groups, sink, desc=f"merge {config.method}", progress=progress)
        sink.close()
        return {**summarise(stats, started), "per_tensor": stats}

    return _finish(write, output, overwrite, report)


__all__ = ["DeltaConfig", "DeltaResult", "MergeConfig", "Selection", "TensorHasher", "check_compatible", "merge",
           "prune_delta"]

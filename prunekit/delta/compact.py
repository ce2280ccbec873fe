"""Compact deltas: only what a pruned fine-tune changes, against a named, checksummed base.

``delta.safetensors`` holds, for each tensor the fine-tune changes, either

- ``NAME::mask`` (uint8, the bitmask of changed entries packed 8 per byte, row-major) and
  ``NAME::values`` (the fine-tune's values at those entries, in the tensor's dtype), or
- ``NAME::dense`` (the whole tensor) when that is smaller (most entries changed);

tensors the fine-tune leaves as the base are not stored. Storing the new values rather than
their differences makes :func:`apply_delta` bit-exact in any dtype (``base + (ft − base)``
rounds in bf16); the delta itself is ``values − base[mask]``. ``prunekit_delta.json``
records the base's checksum (per tensor and overall, see
:class:`~prunekit.delta.stream.TensorHasher`), every tensor's spec and shard, and the
checksum of ``delta.safetensors``, so a wrong base or a corrupted file is an error naming
the tensor or the file, never a wrong model. The fine-tune's config and tokenizer ride
along, so the applied result is a complete Hugging Face directory.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from ..errors import ModelLoadError
from .checkpoint import DTYPES, NAMES, SafetensorsAppender, SafetensorsCheckpoint, TensorSpec, open_checkpoint

DELTA_WEIGHTS = "delta.safetensors"
FORMAT = "prunekit-delta/1"


def pack_mask(mask: Tensor) -> Tensor:
    """A bool tensor as bits, 8 per byte, row-major: ``(ceil(n / 8),)`` uint8."""
    return torch.from_numpy(np.packbits(mask.reshape(-1).numpy()))


def unpack_mask(packed: Tensor, shape: tuple[int, ...]) -> Tensor:
    """The inverse of :func:`pack_mask`."""
    n = int(np.prod(shape)) if shape else 1
    bits = np.unpackbits(packed.numpy(), count=n).astype(bool)
    return torch.from_numpy(bits).reshape(shape)


class CompactSink:
    """Writes ``delta.safetensors`` tensor by tensor; its ``close`` returns the metadata that
    goes into ``prunekit_delta.json``."""

    def __init__(self, directory: Path, specs: Mapping[str, TensorSpec], groups: Mapping[str, list[str]]) -> None:
        self.directory = directory
        self._out = SafetensorsAppender(directory / DELTA_WEIGHTS)
        self._specs = specs
        self._shards = {n: shard for shard, names in groups.items() for n in names}
        self._stored: dict[str, str] = {}

    def write(self, shard: str, name: str, out: Tensor, mask: Tensor) -> None:
        changed = int(mask.sum())
        if changed == 0:
            self._stored[name] = "base"
            return
        sparse_bytes = changed * out.element_size() + (out.numel() + 7) // 8
        if sparse_bytes < out.numel() * out.element_size():
            self._out.write(f"{name}::mask", pack_mask(mask))
            self._out.write(f"{name}::values", out[mask])
            self._stored[name] = "sparse"
        else:
            self._out.write(f"{name}::dense", out)
            self._stored[name] = "dense"

    def close(self) -> dict[str, Any]:
        self._out.close()
        return {"delta_format": FORMAT, "delta_sha256": file_sha256(self.directory / DELTA_WEIGHTS),
                # in writing order, so applying it writes the same files byte for byte
                "tensors": {n: {"dtype": NAMES[self._specs[n].dtype], "shape": list(self._specs[n].shape),
                                "shard": shard, "stored": self._stored[n]} for n, shard in self._shards.items()}}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def read_compact(directory: str | Path) -> dict[str, Any]:
    """The metadata of a compact delta directory, after checking the delta file's checksum."""
    from .stream import REPORT_FILE

    d = Path(directory).expanduser()
    meta_path, weights = d / REPORT_FILE, d / DELTA_WEIGHTS
    if not meta_path.is_file() or not weights.is_file():
        raise ModelLoadError(f"{d} is not a compact delta (no {REPORT_FILE} and {DELTA_WEIGHTS}); write one with "
                             "`prunekit delta BASE FINETUNED --compact --output DIR`")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{meta_path} is corrupt ({exc}); write the compact delta again") from None
    if meta.get("delta_format") != FORMAT:
        raise ModelLoadError(f"{d}: delta format {meta.get('delta_format')!r}, this prunekit reads {FORMAT!r}")
    if file_sha256(weights) != meta["delta_sha256"]:
        raise ModelLoadError(f"{weights} is corrupt or truncated (its checksum differs from the one recorded at "
                             f"writing); copy it again from where it was made")
    return meta


def _check_base(meta: Mapping[str, Any], base: Any) -> None:
    expected = meta["tensors"]
    names = set(base.names())
    for name, entry in expected.items():
        if name not in names:
            raise ModelLoadError(f"this delta was made against {meta['base']}, which has tensor {name!r}; "
                                 f"{base.source} does not: apply it to the base it was made from")
        spec = base.spec(name)
        if NAMES[spec.dtype] != entry["dtype"] or list(spec.shape) != entry["shape"]:
            raise ModelLoadError(f"tensor {name!r} is {NAMES[spec.dtype]} {list(spec.shape)} in {base.source} but "
                                 f"{entry['dtype']} {entry['shape']} in the base this delta was made against "
                                 f"({meta['base']}): apply it to that base")
    if names - set(expected):
        raise ModelLoadError(f"{base.source} has tensor {sorted(names - set(expected))[0]!r}, which the base this "
                             f"delta was made against ({meta['base']}) lacks: apply it to that base")


def apply_delta(delta: str | Path, base: Any, *, output: str | Path | None = None, overwrite: bool = False,
                progress: bool = True) -> Any:
    """Apply a compact delta to its base: the pruned fine-tune, bit for bit, as a Hugging
    Face directory at ``output`` (or as a state dict in the result without one). A base
    whose tensors differ from the one the delta was made against is an error naming the
    first differing tensor; nothing is written."""
    from .stream import (DeltaResult, DenseSink, TensorHasher, _finish, copy_side_files, run_streamed,
                         summarise)

    meta = read_compact(delta)
    b = open_checkpoint(base)
    _check_base(meta, b)
    stored = SafetensorsCheckpoint([Path(delta).expanduser() / DELTA_WEIGHTS], str(delta))
    groups: dict[str, list[str]] = {}
    for name, entry in meta["tensors"].items():
        groups.setdefault(entry["shard"], []).append(name)
    specs = {n: TensorSpec(DTYPES[e["dtype"]], tuple(e["shape"])) for n, e in meta["tensors"].items()}
    expected = meta.get("base_tensor_sha256") or {}
    started = time.perf_counter()

    def step(shard: str, name: str) -> tuple[Tensor, Tensor, dict]:
        t = b.read(name)
        if expected and TensorHasher.digest(name, t) != expected.get(name):
            raise ModelLoadError(f"tensor {name!r} of {b.source} differs from the base this delta was made against "
                                 f"({meta['base']}, sha256 {meta['base_sha256'][:12]}): apply it to that base")
        kind = meta["tensors"][name]["stored"]
        mask = torch.zeros(t.shape, dtype=torch.bool)
        if kind == "sparse":
            mask = unpack_mask(stored.read(f"{name}::mask"), tuple(t.shape))
            t = t.clone()
            t[mask] = stored.read(f"{name}::values")
        elif kind == "dense":
            t = stored.read(f"{name}::dense")
            mask = torch.ones(t.shape, dtype=torch.bool)
        return t, mask, {"numel": t.numel(), "kept": int(mask.sum()), "changed": int(mask.sum()),
                         "pruned": kind == "sparse", "bytes": t.numel() * t.element_size()}

    def write(tmp: Path | None, sink: Any = None) -> dict:
        if sink is None:
            sink = DenseSink(tmp, groups, specs)
            copy_side_files(str(delta), tmp)
        stats = run_streamed(step, groups, sink, desc="apply delta", progress=progress)
        sink.close()
        return {**summarise(stats, started), "per_tensor": stats}

    report = {"command": "apply", "delta": str(delta), "base": b.source, "format": "dense",
              "base_sha256": meta["base_sha256"], "method": meta.get("method"), "drop": meta.get("drop")}
    result: DeltaResult = _finish(write, output, overwrite, report)
    return result


__all__ = ["apply_delta", "pack_mask", "read_compact", "unpack_mask"]

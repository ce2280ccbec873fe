"""Checkpoints read and written one tensor at a time.

Delta pruning and merging touch every tensor of two or more models, but never need two
tensors of the same model at once. So instead of loading state dicts, a :class:`Checkpoint`
lists tensor names and specs from file headers and reads one tensor when asked, and a
:class:`SafetensorsWriter` writes tensors as they come. Peak memory is then a few tensors,
whatever the model size.

Safetensors files are read with plain ``readinto`` at the offsets their header gives, not
through a memory map: pages of a map count as resident memory once touched, which would
make a streamed merge of three 7B models look like (and, under memory pressure, behave like)
a load of all three. The format (an 8-byte little-endian header length, a JSON header of
``{name: {dtype, shape, data_offsets}}``, then the raw bytes) is simple enough to write
directly, so the files written here are ordinary safetensors files that
``from_pretrained`` and ``safetensors.safe_open`` read.
"""
from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Mapping, Protocol

import torch
from torch import Tensor

from ..errors import ModelLoadError

#: safetensors dtype names <-> torch dtypes
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES = {v: k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor is without its data: dtype and shape."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


class Checkpoint(Protocol):
    """Tensors by name, read one at a time. ``source``: where they come from (for messages);
    ``files``: name -> file it lives in (the shard layout, to mirror when writing)."""

    source: str

    def names(self) -> list[str]: ...

    def spec(self, name: str) -> TensorSpec: ...

    def read(self, name: str) -> Tensor: ...

    def shard_of(self, name: str) -> str: ...


def read_header(path: Path) -> tuple[dict[str, dict], int]:
    """The JSON header of a safetensors file and the offset its data starts at."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelLoadError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
            raise ModelLoadError(f"{path} is truncated or not a safetensors file (header of {n} bytes in a "
                                 f"{size}-byte file); copy or download it again")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{path}: corrupt safetensors header ({exc}); copy or download it again") from None
    header.pop("__metadata__", None)
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + n + end > size:
        raise ModelLoadError(f"{path} is truncated: its header describes {8 + n + end} bytes, the file has {size}; "
                             "copy or download it again")
    return header, 8 + n


class SafetensorsCheckpoint:
    """One or more safetensors files (a sharded Hugging Face checkpoint included)."""

    def __init__(self, files: Iterable[Path], source: str) -> None:
        self.source = source
        self._where: dict[str, tuple[Path, dict, int]] = {}
        files = list(files)
        # one file is written back as model.safetensors whatever it was called; shards keep their names
        self._single = len(files) == 1
        for path in files:
            header, start = read_header(path)
            for name, entry in header.items():
                if entry["dtype"] not in DTYPES:
                    raise ModelLoadError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, which prunekit cannot "
                                         f"read; supported: {', '.join(DTYPES)}")
                self._where[name] = (path, entry, start)

    def names(self) -> list[str]:
        return list(self._where)

    def spec(self, name: str) -> TensorSpec:
        _, entry, _ = self._where[name]
        return TensorSpec(DTYPES[entry["dtype"]], tuple(int(s) for s in entry["shape"]))

    def shard_of(self, name: str) -> str:
        return "model.safetensors" if self._single else self._where[name][0].name

    def read(self, name: str) -> Tensor:
        path, entry, start = self._where[name]
        spec = self.spec(name)
        begin, end = (int(o) for o in entry["data_offsets"])
        if end - begin != spec.nbytes:
            raise ModelLoadError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {list(spec.shape)} "
                                 f"{entry['dtype']}; the file is corrupt, copy or download it again")
        buf = bytearray(end - begin)
        with open(path, "rb") as f:
            f.seek(start + begin)
            if f.readinto(buf) != len(buf):
                raise ModelLoadError(f"{path} is truncated inside tensor {name!r}; copy or download it again")
        if not buf:
            return torch.empty(spec.shape, dtype=spec.dtype)
        return torch.frombuffer(buf, dtype=spec.dtype).reshape(spec.shape)


class DictCheckpoint:
    """A state dict in memory, seen through the same interface."""

    def __init__(self, tensors: Mapping[str, Tensor], source: str = "state dict") -> None:
        self.source, self._t = source, tensors

    def names(self) -> list[str]:
        return list(self._t)

    def spec(self, name: str) -> TensorSpec:
        t = self._t[name]
        return TensorSpec(t.dtype, tuple(t.shape))

    def shard_of(self, name: str) -> str:
        return "model.safetensors"

    def read(self, name: str) -> Tensor:
        return self._t[name].detach().cpu()


def _torch_checkpoint(files: list[Path], source: str) -> DictCheckpoint:
    # pickled checkpoints cannot be read tensor by tensor; mmap keeps them out of resident
    # memory until a tensor is touched
    tensors: dict[str, Tensor] = {}
    for f in files:
        try:
            tensors.update(torch.load(f, map_location="cpu", mmap=True, weights_only=True))
        except Exception as exc:  # torch raises many kinds on a corrupt pickle
            raise ModelLoadError(f"cannot read {f}: {exc}") from None
    return DictCheckpoint(tensors, source)


def _shards(directory: Path, index: str, single: str) -> list[Path] | None:
    if (directory / index).is_file():
        weight_map = json.loads((directory / index).read_text())["weight_map"]
        return [directory / f for f in dict.fromkeys(weight_map.values())]
    if (directory / single).is_file():
        return [directory / single]
    return None


def _local_dir(path: str) -> Path:
    p = Path(path).expanduser()
    if p.exists():
        return p
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path):
        raise ModelLoadError(f"{path} does not exist; give a local directory or a hub id such as 'org/model'")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as exc:  # offline, unknown repo, gated: all end here
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelLoadError(f"{path} is neither a local directory nor a hub model that could be downloaded "
                             f"({type(exc).__name__}: {reason}); give a local directory") from None


def open_checkpoint(model: "str | Path | Mapping[str, Tensor]") -> Checkpoint:
    """A checkpoint from a Hugging Face directory (sharded or not, safetensors or pickled
    ``pytorch_model.bin``), a single ``.safetensors`` file, a hub id, or a state dict."""
    if isinstance(model, Mapping):
        return DictCheckpoint(model)
    path = _local_dir(str(model))
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ModelLoadError(f"{path}: expected a model directory or a .safetensors file")
        return SafetensorsCheckpoint([path], str(path))
    files = _shards(path, INDEX, "model.safetensors")
    if files is None:
        found = sorted(path.glob("*.safetensors"))
        files = found or None
    if files:
        return SafetensorsCheckpoint(files, str(path))
    pickled = _shards(path, TORCH_INDEX, "pytorch_model.bin")
    if pickled:
        return _torch_checkpoint(pickled, str(path))
    raise ModelLoadError(f"{path} has no model weights (model.safetensors, its sharded index, or pytorch_model.bin)")


class SafetensorsWriter:
    """Writes one safetensors file tensor by tensor. The header must come first, so the
    specs of every tensor are given up front (name -> spec, in writing order) and each
    :meth:`write` must follow that order with that spec."""

    def __init__(self, path: Path, specs: Mapping[str, TensorSpec], metadata: Mapping[str, str] | None = None) -> None:
        header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for name, spec in specs.items():
            header[name] = {"dtype": NAMES[spec.dtype], "shape": list(spec.shape),
                            "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self._order = list(specs.items())
        self._next = 0
        self.path = path
        self._f: IO[bytes] = open(path, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: Tensor) -> None:
        expected, spec = self._order[self._next]
        if name != expected or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise RuntimeError(f"{self.path}: wrote {name} {tensor.dtype} {list(tensor.shape)}, expected {expected} "
                               f"{spec.dtype} {list(spec.shape)}")  # a bug of the caller, not bad input
        self._next += 1
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        if flat.numel():
            self._f.write(memoryview(flat.view(torch.uint8).numpy()))

    def copy_data(self, source: IO[bytes]) -> None:
        """Copy the data of every announced tensor at once, in order, from ``source``."""
        while chunk := source.read(1 << 24):
            self._f.write(chunk)
        self._next = len(self._order)

    def close(self) -> None:
        self._f.close()
        if self._next != len(self._order):
            raise RuntimeError(f"{self.path}: {len(self._order) - self._next} tensors announced but never written")

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._f.close()


class SafetensorsAppender:
    """Writes one safetensors file whose tensors are not known in advance (a compact delta's
    sizes depend on what survives): data goes to a side file as it comes, and :meth:`close`
    writes the header followed by that data."""

    def __init__(self, path: Path, metadata: Mapping[str, str] | None = None) -> None:
        self.path, self._metadata = path, dict(metadata or {"format": "pt"})
        self._body_path = path.with_name(path.name + ".body")
        self._body: IO[bytes] = open(self._body_path, "wb")
        self._specs: dict[str, TensorSpec] = {}

    def write(self, name: str, tensor: Tensor) -> None:
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        self._specs[name] = TensorSpec(tensor.dtype, tuple(tensor.shape))
        if flat.numel():
            self._body.write(memoryview(flat.view(torch.uint8).numpy()))

    def close(self) -> None:
        self._body.close()
        with SafetensorsWriter(self.path, self._specs, self._metadata) as out, open(self._body_path, "rb") as body:
            out.copy_data(body)
        self._body_path.unlink()


def save_tensors(path: Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write a small state dict (tests, compact deltas) with the streaming writer."""
    with SafetensorsWriter(path, {k: TensorSpec(v.dtype, tuple(v.shape)) for k, v in tensors.items()}, metadata) as w:
        for name, t in tensors.items():
            w.write(name, t)


__all__ = ["Checkpoint", "DictCheckpoint", "SafetensorsAppender", "SafetensorsCheckpoint", "SafetensorsWriter",
           "TensorSpec",           "open_checkpoint", "read_header", "save_tensors"]

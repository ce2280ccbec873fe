"""Compact checkpoints: a pruned model stored at the size of what it keeps.

``prunekit_compact.safetensors`` holds, for every tensor of the state dict, the smallest of

- ``NAME::mask`` + ``NAME::values``: the bitmask of the entries that are not zero (8 per byte,
  row-major) and those entries (unstructured sparsity);
- ``NAME::nm_values`` + ``NAME::nm_index``: for N:M groups along the last axis, the ``n``
  entries of every group ``(rows, groups * n)`` and their positions in the group (``log2 m``
  bits each, packed): the layout semi-structured kernels take;
- ``NAME``: the tensor itself (dense, or not sparse enough to gain).

"Zero" means all bits zero, so ``-0.0`` is a value and the round trip is bit-exact in every
dtype. Tensors that share storage (tied embeddings) are stored once and named in ``aliases``.
``prunekit_compact.json`` records the format, every tensor's dtype, shape and encoding, and the
sha256 of the weights file, so a corrupted or truncated file is an error naming the file, never a
wrong model. The config, tokenizer, recipe and report are the usual files; a model that packing
would shrink by less than 1% (a structurally pruned one) is written the usual way
(``model.safetensors``, loadable with plain ``from_pretrained``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from ..delta.compact import file_sha256, pack_mask, unpack_mask
from ..errors import ModelLoadError

COMPACT_WEIGHTS = "prunekit_compact.safetensors"
COMPACT_META = "prunekit_compact.json"
FORMAT = "prunekit-compact/1"
FORMATS = ("dense", "compact")
#: Group sizes tried for N:M storage (along the last axis).
GROUP_SIZES = (4, 8)
#: How much larger than the bitmask encoding an N:M encoding may be and still be chosen.
NM_SLACK = 0.01
#: The least fraction of the weights' bytes packing must save to be written (else the usual files,
#: which plain ``from_pretrained`` loads, are written: e.g. a FLAP result, whose only zeros are the
#: biases its config switch adds).
MIN_GAIN = 0.01
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# ---------------------------------------------------------------------------------------------
# pure tensor encodings
# ---------------------------------------------------------------------------------------------

def nonzero_bits(t: Tensor) -> Tensor:
    """``t != 0`` by bit pattern (``-0.0`` counts as a value), same shape, bool."""
    if t.is_complex():
        return nonzero_bits(torch.view_as_real(t)).any(-1)
    if t.is_floating_point():
        return t.contiguous().view(_INT_VIEW[t.element_size()]) != 0
    return t != 0


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """Small non-negative integers ``(k,)`` (each below ``2 ** bits``) packed ``bits`` each: uint8."""
    v = values.to(torch.uint8).numpy()[:, None]  # (k, 1)
    planes = np.unpackbits(v, axis=1)[:, 8 - bits:]  # (k, bits), most significant first
    return torch.from_numpy(np.packbits(planes.reshape(-1)))


def unpack_bits(packed: Tensor, bits: int, count: int) -> Tensor:
    """The inverse of :func:`pack_bits`: ``(count,)`` int64."""
    planes = np.unpackbits(packed.numpy(), count=count * bits).reshape(count, bits)
    full = np.concatenate([np.zeros((count, 8 - bits), dtype=np.uint8), planes], axis=1)
    return torch.from_numpy(np.packbits(full, axis=1)[:, 0].astype(np.int64))


def nm_shape(t: Tensor, nz: Tensor, m: int) -> int | None:
    """The ``n`` of the N:M pattern (groups of ``m`` along the last axis) ``t`` satisfies, if
    at most half of every group is nonzero; else None."""
    if t.dim() < 2 or t.shape[-1] % m:
        return None
    n = int(nz.reshape(-1, m).sum(-1).max()) if nz.numel() else 0
    return n if 0 < n <= m // 2 else None


def encode_nm(t: Tensor, nz: Tensor, n: int, m: int) -> tuple[Tensor, Tensor]:
    """``(values (rows, groups * n), packed positions)`` of ``t`` ``(..., cols)`` in groups of
    ``m`` along the last axis: per group its nonzero entries first, padded with zero entries,
    ``n`` in all, in ascending position."""
    rows = t.numel() // t.shape[-1]
    groups = t.reshape(rows, -1, m)  # (rows, G, m)
    key = (~nz).reshape(rows, -1, m).to(torch.int64) * m + torch.arange(m)  # nonzero first, then by position
    pos = key.argsort(dim=-1)[..., :n].sort(dim=-1).values  # (rows, G, n)
    values = groups.gather(-1, pos).reshape(rows, -1)  # (rows, G * n)
    return values.contiguous(), pack_bits(pos.reshape(-1), int(math.log2(m)))


def decode_nm(values: Tensor, packed: Tensor, shape: tuple[int, ...], n: int, m: int) -> Tensor:
    """The tensor of ``shape`` from :func:`encode_nm`'s output."""
    rows = math.prod(shape) // shape[-1]
    pos = unpack_bits(packed, int(math.log2(m)), values.numel()).reshape(rows, -1, n)  # (rows, G, n)
    out = torch.zeros(rows, shape[-1] // m, m, dtype=values.dtype)
    out.scatter_(-1, pos, values.reshape(rows, -1, n))
    return out.reshape(shape)


def encode(t: Tensor) -> tuple[str, dict[str, Tensor], dict[str, Any]]:
    """The smallest encoding of one tensor: ``(kind, {suffix: tensor}, extra metadata)``; kind is
    ``dense``, ``sparse`` (bitmask + values) or ``nm``. An N:M layout (what kernels take) is
    chosen when it is at most :data:`NM_SLACK` larger than the bitmask (a kept weight that is
    exactly zero makes the bitmask a few values shorter)."""
    t = t.detach().cpu().contiguous()
    size, es = t.numel(), t.element_size()
    if size == 0 or t.dtype == torch.bool:
        return "dense", {"": t}, {}
    nz = nonzero_bits(t)
    dense, sparse = size * es, int(nz.sum()) * es + (size + 7) // 8
    nm: tuple[int, int, int] | None = None  # (bytes, n, m)
    for m in GROUP_SIZES:
        if (n := nm_shape(t, nz, m)) is not None:
            stored = size // m * n
            nm = min(nm or (dense, 0, 0), (stored * es + (stored * int(math.log2(m)) + 7) // 8, n, m))
    if nm is not None and nm[1] and nm[0] <= min(dense, sparse * (1 + NM_SLACK)):
        values, index = encode_nm(t, nz, nm[1], nm[2])
        return "nm", {"::nm_values": values, "::nm_index": index}, {"n": nm[1], "m": nm[2]}
    if sparse < dense:
        return "sparse", {"::mask": pack_mask(nz), "::values": t[nz]}, {}
    return "dense", {"": t}, {}


def decode(kind: str, read: Any, name: str, entry: Mapping[str, Any], dtype: torch.dtype) -> Tensor:
    """One tensor back from its encoding; ``read(key)`` reads a stored tensor."""
    shape = tuple(entry["shape"])
    if kind == "dense":
        return read(name)
    if kind == "sparse":
        mask = unpack_mask(read(f"{name}::mask"), shape)
        out = torch.zeros(shape, dtype=dtype)
        out[mask] = read(f"{name}::values")
        return out
    if kind == "nm":
        return decode_nm(read(f"{name}::nm_values"), read(f"{name}::nm_index"), shape, entry["n"], entry["m"])
    raise ModelLoadError(f"tensor {name!r} has encoding {kind!r}, which this prunekit does not read")


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------

def _aliases(state: Mapping[str, Tensor]) -> dict[str, str]:
    """Names whose tensor is the same storage, shape and strides as an earlier name's: ``{alias: source}``."""
    seen: dict[tuple, str] = {}
    out: dict[str, str] = {}
    for name, t in state.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and key in seen:
            out[name] = seen[key]
        else:
            seen.setdefault(key, name)
    return out


def compact_state(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """The tensors to store and the metadata for ``state``; None when packing saves less than
    :data:`MIN_GAIN` of the bytes (nothing worth packing: save the usual way)."""
    aliases = _aliases(state)
    stored: dict[str, Tensor] = {}
    tensors: dict[str, Any] = {}
    for name, t in state.items():
        if name in aliases:
            continue
        kind, parts, extra = encode(t)
        stored.update({name + suffix: v for suffix, v in parts.items()})
        tensors[name] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "stored": kind,
                         **extra}
    packed = sum(t.numel() * t.element_size() for t in stored.values())
    dense = sum(t.numel() * t.element_size() for n, t in state.items() if n not in aliases)
    if packed > (1 - MIN_GAIN) * dense:  # not worth losing plain from_pretrained for
        return None
    return stored, {"format": FORMAT, "tensors": tensors, "aliases": aliases}


def write_compact(directory: Path, state: Mapping[str, Tensor]) -> dict[str, Any] | None:
    """Write the compact weights and metadata into ``directory``; returns the metadata, or None
    when there is nothing to pack (nothing is written)."""
    from safetensors.torch import save_file

    packed = compact_state(state)
    if packed is None:
        return None
    stored, meta = packed
    save_file(stored, str(directory / COMPACT_WEIGHTS))
    meta["sha256"] = file_sha256(directory / COMPACT_WEIGHTS)
    (directory / COMPACT_META).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return meta


def is_compact(directory: str | Path) -> bool:
    return (Path(directory) / COMPACT_META).is_file()


def compact_dtype(directory: str | Path) -> torch.dtype | None:
    """The floating dtype most of a compact checkpoint's elements are stored in (None if unreadable:
    reading the weights then reports what is wrong)."""
    try:
        entries = json.loads((Path(directory) / COMPACT_META).read_text(encoding="utf-8"))["tensors"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return None
    counts: dict[str, int] = {}
    for e in entries.values():
        dtype = getattr(torch, str(e.get("dtype")), None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            counts[e["dtype"]] = counts.get(e["dtype"], 0) + math.prod(e["shape"])
    return getattr(torch, max(counts, key=counts.get)) if counts else None


def checkpoint_info(directory: str | Path) -> dict[str, Any]:
    """How a saved result stores its weights: ``format`` (dense or compact), ``file_bytes`` (all
    its weights files) and, compact, the number of tensors in each encoding."""
    d = Path(directory)
    if is_compact(d):
        entries = json.loads((d / COMPACT_META).read_text(encoding="utf-8"))["tensors"]
        kinds = [e["stored"] for e in entries.values()]
        return {"format": "compact", "file_bytes": (d / COMPACT_WEIGHTS).stat().st_size,
                "tensors": {k: kinds.count(k) for k in ("dense", "sparse", "nm")}}
    files = [f for f in d.glob("*.safetensors") if not f.name.startswith("prunekit_")]
    return {"format": "dense", "file_bytes": sum(f.stat().st_size for f in files)}


def read_compact_state(directory: str | Path) -> dict[str, Tensor]:
    """The full state dict of a compact checkpoint, bit for bit what was saved, after checking
    the weights file against the checksum recorded at writing."""
    from safetensors import safe_open

    d = Path(directory).expanduser()
    meta_path, weights = d / COMPACT_META, d / COMPACT_WEIGHTS
    if not weights.is_file():
        raise ModelLoadError(f"{d} has {COMPACT_META} but no {COMPACT_WEIGHTS}; copy the whole directory again")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        entries, aliases, digest = meta["tensors"], meta["aliases"], meta["sha256"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{meta_path} is corrupt ({type(exc).__name__}: {exc}); save the model again") from None
    if meta.get("format") != FORMAT:
        raise ModelLoadError(f"{d}: compact format {meta.get('format')!r}; this prunekit reads {FORMAT!r}")
    if file_sha256(weights) != digest:
        raise ModelLoadError(f"{weights} is corrupt or truncated (its sha256 differs from the one recorded when it "
                             "was written); copy it again from where it was saved")
    state: dict[str, Tensor] = {}
    with safe_open(str(weights), framework="pt") as f:
        for name, entry in entries.items():
            dtype = getattr(torch, entry["dtype"])
            state[name] = decode(entry["stored"], f.get_tensor, name, entry, dtype)
            if list(state[name].shape) != entry["shape"] or state[name].dtype != dtype:
                raise ModelLoadError(f"{weights}: tensor {name!r} decodes to {state[name].dtype} "
                                     f"{list(state[name].shape)}, not the recorded {entry['dtype']} {entry['shape']}")
    for alias, source in aliases.items():
        state[alias] = state[source]
    return state


__all__ = ["COMPACT_META", "COMPACT_WEIGHTS", "FORMATS", "checkpoint_info", "compact_dtype", "compact_state", "decode", "decode_nm", "encode",
           "encode_nm", "is_compact", "nonzero_bits", "pack_bits", "read_compact_state", "unpack_bits",
           "write_compact"]

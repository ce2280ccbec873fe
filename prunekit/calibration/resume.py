"""Block-by-block checkpoints of the sequential runner, so a killed run resumes where it stopped.

After each block a run writes, in its checkpoint directory, the block's weights as pruned
(``block-I.safetensors``, written once and never rewritten), every batch's hidden state
leaving it (``hidden-I.safetensors``) and, last, ``progress.json``: the run's key, the number
of blocks done, what the runner reported for them and the caller's own state. Each file goes
under a temporary name and is renamed into place; ``progress.json`` names the files it goes
with, so a SIGKILL at any moment leaves either the previous consistent checkpoint or the new
one. A restarted run with the same key loads the finished blocks' weights, continues from the
saved hidden states and gives the same result, bit for bit, as a run never interrupted (the
work left is the same computation on the same tensors). A checkpoint whose key differs (another
recipe, model or calibration data) is refused with an error naming the directory.

What resuming costs: the first block's inputs are captured again (the model's embeddings on
every batch) and any pass that ran before the blocks (allocation statistics) runs again.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..errors import ConfigError

PROGRESS = "progress.json"


@dataclass(frozen=True)
class Checkpoint:
    """Where a run keeps its progress (``path``) and what identifies it (``key``: a digest of
    everything the result depends on). ``state``/``restore``: the caller's own JSON-able state,
    saved beside the runner's after each block and handed back on resume."""

    path: Path
    key: str
    state: Callable[[], dict[str, Any]] | None = None
    restore: Callable[[dict[str, Any]], None] | None = None


def digest(*parts: Any) -> str:
    """A key from JSON-able parts and tensors (their dtype, shape and bytes)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Tensor):
            t = part.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def save_tensors(tensors: dict[str, Tensor], dest: Path) -> None:
    """``tensors`` to the safetensors file ``dest``, through a temporary name renamed into place."""
    from safetensors.torch import save_file

    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().cpu().clone() for k, v in tensors.items()}, str(tmp))  # shared storage: copies
    os.replace(tmp, dest)


def read_record(file: Path, key: str, root: Path) -> dict[str, Any] | None:
    """The JSON record ``file`` of a run keyed ``key`` (None when absent); an error naming
    ``root`` for a corrupt record or another run's."""
    if not file.is_file():
        return None
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"the checkpoint {file} is corrupt ({exc}); delete {root} to start over") from None
    if record.get("key") != key:
        raise ConfigError(f"the checkpoint in {root} is from another run (a different recipe, model or "
                          f"calibration data); delete {root} to start this one over, or write to another --output")
    return record


def load_into(module: nn.Module, state: dict[str, Tensor], root: Path, what: str) -> None:
    """Copy a saved ``state`` into ``module``'s own tensors; an error unless names and shapes match."""
    own = module.state_dict()
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        raise ConfigError(f"the checkpoint in {root} does not fit {what} of this model; delete it to start over")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state[k])


def load_progress(ckpt: Checkpoint) -> dict[str, Any] | None:
    """The saved progress of this run, None when there is none; an error for another run's."""
    return read_record(ckpt.path / PROGRESS, ckpt.key, ckpt.path)


def restore_blocks(ckpt: Checkpoint, progress: dict[str, Any], modules: nn.ModuleList) -> list[Tensor]:
    """Load the finished blocks' weights into ``modules``; return the saved hidden states."""
    from safetensors.torch import load_file

    for i in range(progress["done"]):
        load_into(modules[i], load_file(str(ckpt.path / f"block-{i}.safetensors")), ckpt.path, f"block {i}")
    hidden = load_file(str(ckpt.path / progress["hidden"]))
    if ckpt.restore is not None:
        ckpt.restore(progress.get("state", {}))
    return [hidden[str(b)] for b in range(len(hidden))]


def save_block(ckpt: Checkpoint, i: int, block: nn.Module, hidden: list[Tensor], report: dict[str, Any]) -> None:
    """Record that block ``i`` is done: its weights, the hidden states leaving it, then the progress."""
    from ..atomic import write_text_atomically

    ckpt.path.mkdir(parents=True, exist_ok=True)
    save_tensors(block.state_dict(), ckpt.path / f"block-{i}.safetensors")
    name = f"hidden-{i}.safetensors"
    save_tensors({str(b): h for b, h in enumerate(hidden)}, ckpt.path / name)
    progress = {"key": ckpt.key, "done": i + 1, "hidden": name, "report": report,
                "state": ckpt.state() if ckpt.state is not None else {}}
    write_text_atomically(ckpt.path / PROGRESS, json.dumps(progress, default=str))
    old = ckpt.path / f"hidden-{i - 1}.safetensors"
    old.unlink(missing_ok=True)  # the progress no longer names it


__all__ = ["Checkpoint", "digest", "load_into", "load_progress", "read_record", "restore_blocks", "save_block",
           "save_tensors"]

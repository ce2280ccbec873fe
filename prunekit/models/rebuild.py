"""Rebuilding a structurally pruned model from its saved directory: a fresh instance of the
architecture (from ``config.json``, or one the caller passes for a plain PyTorch model) is
resized to the shapes in ``prunekit_structure.json``, its size attributes re-derived from those
shapes (:func:`prunekit.models.sizes.sync_attributes`), and the weights loaded."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelLoadError
from .sizes import apply_attributes, snapshot, sync_attributes

STRUCTURE_FILE = "prunekit_structure.json"


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner, _, attr = name.rpartition(".")
    return (model.get_submodule(owner) if owner else model), attr


def read_record(path: str | Path) -> dict[str, Any] | None:
    file = Path(path) / STRUCTURE_FILE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{file} is corrupt ({exc}); re-save the pruned model") from exc


def resize_to(model: nn.Module, record: dict[str, Any]) -> None:
    """Give every tensor the recorded shape (uninitialised), then bring size attributes in line
    with the shapes (and re-apply attribute changes older records list)."""
    before = snapshot(model)
    for name, shape in record["shapes"].items():
        module, attr = _owner(model, name)
        t = getattr(module, attr, None)
        if t is None and attr == "bias" and isinstance(module, nn.Linear):  # added by bias compensation
            module.bias = nn.Parameter(torch.empty(shape, dtype=module.weight.dtype))
        elif t is not None and list(t.shape) != list(shape):
            t.data = torch.empty(shape, dtype=t.dtype)
    sync_attributes(model, before)
    apply_attributes(model, record.get("attrs", {}))


def load_structured(path: str | Path, model: nn.Module | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Reload a structurally pruned model saved by prunekit.

    Hugging Face directories rebuild from their config (``model`` not needed); a plain
    PyTorch result needs ``model``: a fresh instance of the unpruned architecture.
    """
    from ..export.compact import is_compact

    path = Path(path)
    record = read_record(path)
    if record is None and is_compact(path):  # a compact checkpoint whose config describes the model
        record = {"format": "huggingface" if model is None else "state_dict", "shapes": {}}
    if record is None:
        raise ModelLoadError(f"{path} has no {STRUCTURE_FILE}; it is not a structurally pruned prunekit result")
    if record.get("format") == "huggingface":
        import transformers

        config = transformers.AutoConfig.from_pretrained(path)
        arch = (config.architectures or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        if cls is None:
            raise ModelLoadError(f"{path}: unknown architecture {arch!r} in config.json")
        model = cls._from_config(config, dtype=dtype)  # buffers (rotary inv_freq) stay as from_pretrained makes them
    elif model is None:
        raise ModelLoadError(f"{path} holds a plain PyTorch state dict: pass model=<a fresh instance of its architecture>")
    if record.get("slicegpt_blocks"):  # layers whose residual carries SliceGPT's shortcut matrices
        from ..structural.slicegpt import add_shortcuts

        add_shortcuts(model, record["slicegpt_blocks"])
    resize_to(model, record)
    state = read_weights(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if _is_tied(model, k)}
    if set(missing) - tied or unexpected:
        raise ModelLoadError(f"{path}: weights do not match the recorded structure "
                             f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state dict saved in ``path``: a compact checkpoint decoded, or every ``*.safetensors``
    weights file (not prunekit's side files)."""
    from safetensors.torch import load_file

    from ..export.compact import is_compact, read_compact_state

    if is_compact(path):
        return read_compact_state(path)
    files = sorted(f for f in path.glob("*.safetensors") if not f.name.startswith("prunekit_"))
    if not files:
        raise ModelLoadError(f"{path} has no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def _is_tied(model: nn.Module, key: str) -> bool:
    """A key absent from the file because it shares storage with another (tied embeddings)."""
    tensors = model.state_dict(keep_vars=True)
    target = tensors.get(key)
    return target is not None and any(v is target for k, v in tensors.items() if k != key)

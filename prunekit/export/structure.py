"""Saving and reloading structurally pruned models.

* A Hugging Face model pruned uniformly (every layer keeps the same head/neuron counts)
  gets a config describing its new sizes, so plain ``from_pretrained`` reloads it.
* A non-uniform one keeps a standard directory (safetensors + config + tokenizer) plus
  ``prunekit_structure.json`` with every tensor's shape and the module attributes that
  changed; :func:`load_structured` rebuilds it from the config, resizes, and loads.
* A plain PyTorch model is saved as ``model.safetensors`` + ``prunekit_structure.json`` +
  recipe, and reloads into a fresh instance of its (unpruned) architecture, without pickle.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import write_dir_atomically
from ..errors import ModelLoadError
from ..structural.remove import apply_attributes, owner_of
from .save import RECIPE_FILE, REPORT_FILE, check_output

STRUCTURE_FILE = "prunekit_structure.json"
WEIGHTS_FILE = "model.safetensors"
#: Config attributes that describe per-layer sizes, by what they count.
SIZE_ATTRS = {
    "intermediate": ("intermediate_size", "ffn_dim", "n_inner"),
    "heads": ("num_attention_heads",),
    "kv_heads": ("num_key_value_heads",),
    "hidden": ("hidden_size",),
}


def fit_hf_config(model: nn.Module) -> bool:
    """Update ``model.config`` to the pruned sizes if one config can describe every layer
    (checked by building the architecture on the meta device); otherwise leave it as it
    was. Returns True when the config now matches the model."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return False
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for candidate in _candidates(model, config):
        with torch.device("meta"):
            try:
                fresh = type(model)(candidate)
            except Exception:  # noqa: BLE001 - a config the class rejects is simply not a fit
                continue
        if {k: tuple(v.shape) for k, v in fresh.state_dict().items()} == shapes:
            for key, value in candidate.to_dict().items():
                if getattr(config, key, None) != value and key in SIZE_KEYS:
                    setattr(config, key, value)
            return True
    return False


SIZE_KEYS = {a for attrs in SIZE_ATTRS.values() for a in attrs} | {"n_embd", "n_head", "d_model"}


def _candidates(model: nn.Module, config: Any) -> list[Any]:
    """The current config, then one with sizes read off the first layer of each kind."""
    sizes = _sizes_from_model(model)
    updated = copy.deepcopy(config)
    for kind, value in sizes.items():
        for attr in SIZE_ATTRS[kind]:
            if hasattr(updated, attr) and value is not None:
                setattr(updated, attr, value)
    return [config, updated]


def _sizes_from_model(model: nn.Module) -> dict[str, int | None]:
    sizes: dict[str, int | None] = {}
    for m in model.modules():
        if "heads" not in sizes and isinstance(getattr(m, "num_key_value_groups", None), int):
            q = getattr(m, "q_proj", None)
            k = getattr(m, "k_proj", None)
            head_dim = getattr(m, "head_dim", None)
            if q is not None and k is not None and isinstance(head_dim, int):
                sizes["heads"] = q.weight.shape[0] // head_dim
                sizes["kv_heads"] = k.weight.shape[0] // head_dim
        for up in ("up_proj", "fc1", "c_fc"):
            layer = getattr(m, up, None)
            if "intermediate" not in sizes and layer is not None and hasattr(layer, "weight"):
                w = layer.weight
                sizes["intermediate"] = w.shape[1] if type(layer).__name__ == "Conv1D" else w.shape[0]
        if "hidden" not in sizes and isinstance(m, nn.Embedding) and m is _input_embeddings(model):
            sizes["hidden"] = m.embedding_dim
    return sizes


def _input_embeddings(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_input_embeddings", None)
    try:
        return get() if get else None
    except NotImplementedError:
        return None


def save_structured(model: nn.Module, path: str | Path, *, record: dict[str, Any], recipe_yaml: str,
                    report: dict[str, Any], tokenizer: Any = None, overwrite: bool = False) -> Path:
    """Write a structurally pruned model atomically (see the module docstring)."""
    out = check_output(path, overwrite)
    is_hf = hasattr(model, "save_pretrained") and hasattr(model, "config")
    uniform = fit_hf_config(model) if is_hf else False
    body = dict(record, uniform=uniform, format="huggingface" if is_hf else "state_dict")

    def write(tmp: Path) -> None:
        if is_hf:
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        else:
            from safetensors.torch import save_model

            save_model(model, str(tmp / WEIGHTS_FILE))
        (tmp / STRUCTURE_FILE).write_text(json.dumps(body, indent=1) + "\n", encoding="utf-8")
        (tmp / RECIPE_FILE).write_text(recipe_yaml, encoding="utf-8")
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    return write_dir_atomically(out, write, replace=True)


def read_record(path: str | Path) -> dict[str, Any] | None:
    file = Path(path) / STRUCTURE_FILE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{file} is corrupt ({exc}); re-save the pruned model") from exc


def resize_to(model: nn.Module, record: dict[str, Any]) -> None:
    """Give every tensor the recorded shape (uninitialised) and re-apply attribute changes."""
    for name, shape in record["shapes"].items():
        module, attr = owner_of(model, name)
        t = getattr(module, attr, None)
        if t is None and attr == "bias" and isinstance(module, nn.Linear):  # added by bias compensation
            module.bias = nn.Parameter(torch.empty(shape, dtype=module.weight.dtype))
        elif t is not None and list(t.shape) != list(shape):
            t.data = torch.empty(shape, dtype=t.dtype)
    apply_attributes(model, record.get("attrs", {}))


def load_structured(path: str | Path, model: nn.Module | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Reload a structurally pruned model saved by prunekit.

    Hugging Face directories rebuild from their config (``model`` not needed); a plain
    PyTorch result needs ``model``: a fresh instance of the unpruned architecture.
    """
    from safetensors.torch import load_file

    path = Path(path)
    record = read_record(path)
    if record is None:
        raise ModelLoadError(f"{path} has no {STRUCTURE_FILE}; it is not a structurally pruned prunekit result")
    if record.get("format") == "huggingface":
        import transformers

        config = transformers.AutoConfig.from_pretrained(path)
        arch = (config.architectures or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        if cls is None:
            raise ModelLoadError(f"{path}: unknown architecture {arch!r} in config.json")
        model = cls(config).to(dtype)
    elif model is None:
        raise ModelLoadError(f"{path} holds a plain PyTorch state dict: pass model=<a fresh instance of its architecture>")
    resize_to(model, record)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} has no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if _is_tied(model, k)}
    if set(missing) - tied or unexpected:
        raise ModelLoadError(f"{path}: weights do not match the recorded structure "
                             f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.prunekit_structure = record  # so a later save (e.g. weight pruning on top) keeps it
    return model.eval()


def _is_tied(model: nn.Module, key: str) -> bool:
    """A key absent from the file because it shares storage with another (tied embeddings)."""
    tensors = model.state_dict(keep_vars=True)
    target = tensors.get(key)
    return target is not None and any(v is target for k, v in tensors.items() if k != key)

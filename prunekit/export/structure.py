"""Describing a structurally pruned model for saving.

* A Hugging Face model pruned uniformly (every layer keeps the same head/neuron counts)
  gets a config describing its new sizes, so plain ``from_pretrained`` reloads it. When the
  only difference is a bias that FLAP's compensation added, the config's own bias switch
  (``mlp_bias`` / ``attention_bias`` on Llama-style configs) is turned on and the other layers
  that switch covers get zero biases, which changes no output.
* A non-uniform one is a standard directory plus ``prunekit_structure.json`` with every
  tensor's shape (:func:`structure_record`); :mod:`prunekit.models.rebuild` reloads it.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..models.rebuild import STRUCTURE_FILE, load_structured, read_record, resize_to  # noqa: F401 (re-exported)

from ..models.adapters import Adapter, adapter_for


def fit_hf_config(model: nn.Module) -> bool:
    """Update ``model.config`` to the pruned sizes if one config can describe every layer
    (checked by building the architecture on the meta device); otherwise leave it as it
    was. Returns True when the config now matches the model."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return False
    adapter = adapter_for(model)
    shapes = _shapes(model)
    for candidate in _candidates(model, config, adapter):
        fresh = _fresh_shapes(model, candidate)
        if fresh is not None and fresh != shapes:
            fresh = _with_bias_switches(model, candidate, shapes, fresh, adapter.bias_switches)
        if fresh is not None and fresh == _shapes(model):
            for key, value in candidate.to_dict().items():
                if getattr(config, key, None) != value and (key in adapter.size_fields or key in adapter.bias_switches):
                    setattr(config, key, value)
            return True
    return False


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _fresh_shapes(model: nn.Module, config: Any) -> dict[str, tuple[int, ...]] | None:
    with torch.device("meta"):
        try:
            return _shapes(type(model)(config))
        except Exception:  # noqa: BLE001 - a config the class rejects is simply not a fit
            return None


def _with_bias_switches(model: nn.Module, candidate: Any, shapes: dict, fresh: dict,
                        switches: tuple[str, ...]) -> dict | None:
    """If ``model`` differs from ``candidate`` only by extra biases, and turning on the config's
    bias switches makes every shape match once the other layers they cover get zero biases,
    do that (biases added, switches set on ``candidate``) and return the new shapes; else None
    and nothing changes."""
    extra = set(shapes) - set(fresh)
    if not extra or not all(k.endswith(".bias") for k in extra) or set(fresh) - set(shapes):
        return None
    if any(fresh[k] != shapes[k] for k in fresh):
        return None
    switched = copy.deepcopy(candidate)
    flags = [f for f in switches if getattr(switched, f, None) is False]
    for flag in flags:
        setattr(switched, flag, True)
    wanted = _fresh_shapes(model, switched)
    if wanted is None or set(shapes) - set(wanted) or any(wanted[k] != shapes[k] for k in shapes):
        return None
    added = []
    for key in set(wanted) - set(shapes):
        module = model.get_submodule(key.rpartition(".")[0])
        if not (key.endswith(".bias") and isinstance(module, nn.Linear) and module.bias is None):
            return None
        added.append(module)
    with torch.no_grad():
        for module in added:  # zero biases change no output
            module.bias = nn.Parameter(torch.zeros(module.out_features, dtype=module.weight.dtype,
                                                   device=module.weight.device))
    for flag in flags:
        setattr(candidate, flag, True)
    return wanted


def _candidates(model: nn.Module, config: Any, adapter: Adapter) -> list[Any]:
    """The current config, then one with sizes read off the first layer of each kind."""
    sizes = _sizes_from_model(model, adapter)
    updated = copy.deepcopy(config)
    for kind, value in sizes.items():
        for attr in adapter.sizes.get(kind, ()):
            if hasattr(updated, attr) and value is not None:
                setattr(updated, attr, value)
    return [config, updated]


def _child(module: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    for name in names:
        try:
            return module.get_submodule(name)
        except AttributeError:
            continue
    return None


def _sizes_from_model(model: nn.Module, adapter: Adapter) -> dict[str, int | None]:
    sizes: dict[str, int | None] = {}
    layout = adapter.attention
    for m in model.modules():
        if "heads" not in sizes and isinstance(getattr(m, "num_key_value_groups", None), int):
            q, k = _child(m, layout.query), _child(m, layout.key)
            head_dim = getattr(m, "head_dim", None)
            if q is not None and k is not None and isinstance(head_dim, int):
                sizes["heads"] = q.weight.shape[0] // head_dim
                sizes["kv_heads"] = k.weight.shape[0] // head_dim
        if "intermediate" not in sizes and not isinstance(m, nn.ModuleList):
            layer = _child(m, adapter.mlp_up)
            if layer is not None and isinstance(getattr(layer, "weight", None), torch.Tensor) and m is not model:
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


def structure_record(model: nn.Module, uniform: bool) -> dict[str, Any]:
    """What rebuilding ``model`` needs: every tensor's shape, the format, and whether its
    config alone describes it."""
    from ..structural.slicegpt import sliced_blocks

    is_hf = hasattr(model, "save_pretrained") and hasattr(model, "config")
    record = {"format": "huggingface" if is_hf else "state_dict", "uniform": uniform,
              "shapes": {n: list(t.shape) for n, t in model.state_dict(keep_vars=True).items()}}
    if blocks := sliced_blocks(model):  # rebuilt with their shortcut matrices (prunekit.structural.slicegpt)
        record["slicegpt_blocks"] = blocks
    return record

"""Where the blocks of a decoder-only model are. Works for any model whose transformer
blocks live in one nn.ModuleList (Llama, Mistral, Qwen, Gemma, OPT, GPT-2, Phi, ...)."""
from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The model's blocks and their qualified name: where its family's adapter says they are,
    else the ModuleList holding most parameters; None if there is none. An encoder-decoder
    model is refused (it has two stacks)."""
    from .adapters import adapter_for, check_single_stack

    check_single_stack(model)
    path = adapter_for(model).blocks
    if path is not None:
        try:
            found = model.get_submodule(path)
        except AttributeError:
            found = None
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return path, found
        # a head class (e.g. GPT2LMHeadModel) puts the base model one level down
        for prefix, module in model.named_modules():
            if prefix and isinstance(module, nn.ModuleList) and prefix.endswith("." + path) and len(module) > 0:
                return prefix, module
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, name, module)
    return None if best is None or best[0] == 0 else (best[1], best[2])


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList holding most of the model's parameters, and its qualified name."""
    found = block_list(model)
    if found is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no nn.ModuleList of blocks; prunekit's layer-by-layer "
            "runner needs the transformer blocks in one ModuleList (e.g. model.model.layers)"
        )
    return found

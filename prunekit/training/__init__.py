"""Training-time pruning: a controller for any training loop, callbacks for the Hugging Face
``Trainer`` (:class:`SparsityCallback`) and PyTorch Lightning (:func:`lightning_callback`),
and parameter-efficient recovery after one-shot pruning."""
from __future__ import annotations

from typing import Any

from .controller import SparsityController
from .lightning import lightning_callback
from .recovery import (add_masked_lora, add_peft_lora, bias_norm_parameters, merge_masked_lora,
                       merge_peft_lora)

__all__ = ["SparsityController", "SparsityCallback", "lightning_callback", "bias_norm_parameters",
           "add_masked_lora", "merge_masked_lora", "add_peft_lora", "merge_peft_lora"]


def __getattr__(name: str) -> Any:
    if name == "SparsityCallback":  # imports transformers' Trainer machinery only when asked for
        from .hf import SparsityCallback

        return SparsityCallback
    raise AttributeError(name)

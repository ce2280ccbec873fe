"""Devices and dtypes: parsing ``--device`` / ``--dtype``, and placing a model.

A model that fits on the chosen accelerator moves there whole. One that does not stays in
CPU memory, and the sequential runner moves each block to the accelerator while it is
calibrated and pruned (sequential onloading), so one GPU prunes a model larger than itself.
"""
from __future__ import annotations

import logging
import re

import torch
from torch import nn

from ..errors import ConfigError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """``auto`` (the dtype the checkpoint is stored in), a name from :data:`DTYPES`, or a dtype."""
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ConfigError(f"dtype {dtype} is not supported; use one of {', '.join(DTYPE_CHOICES)}")
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[dtype]


def parse_device(device: str | torch.device | None) -> torch.device:
    """``auto`` (a GPU if there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if isinstance(device, torch.device):
        spec = str(device)
    else:
        spec = (device or "auto").strip().lower()
    if not _DEVICE.match(spec):
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {spec}: CUDA is not available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {spec}: this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def place(model: nn.Module, device: torch.device, headroom: float = 0.7) -> torch.device:
    """Move ``model`` to ``device`` if it takes at most ``headroom`` of the free memory there
    (the rest is for activations); otherwise leave it in CPU memory. Returns the device blocks
    compute on, for the runner."""
    if device.type == "cpu":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    need = model_bytes(model)
    if need <= headroom * free:
        model.to(device)
    else:
        log.info("model (%.1f GB) does not fit in %.1f GB free on %s: blocks are moved there one at a time",
                 need / 1e9, free / 1e9, device)
    return device


__all__ = ["DTYPES", "DTYPE_CHOICES", "parse_dtype", "parse_device", "place", "model_bytes"]

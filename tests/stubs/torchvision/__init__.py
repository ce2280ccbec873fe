"""A stand-in for the torchvision names timm imports at import time. There is no CPU build of
torchvision on this machine, and timm's models themselves are plain PyTorch. Put on sys.path
only when the real torchvision is missing (tests and benchmarks/breadth).

``torchvision.ops.misc.FrozenBatchNorm2d`` and ``InterpolationMode`` are real (timm builds
with them); every other name of every ``torchvision.*`` module is a placeholder that raises
when used, so nothing runs on a fake."""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from enum import Enum

import torch
from torch import nn

__version__ = "0.0-stub"


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (buffers, not parameters)."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        for name, fill in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((num_features,), fill))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return x * scale[:, None, None] + (self.bias - self.running_mean * scale)[:, None, None]


class InterpolationMode(Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


REAL = {"torchvision.ops.misc": {"FrozenBatchNorm2d": FrozenBatchNorm2d},
        "torchvision.transforms.functional": {"InterpolationMode": InterpolationMode},
        "torchvision.transforms": {"InterpolationMode": InterpolationMode}}


def _placeholder(module: str, name: str) -> type:
    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"{module}.{name} is a placeholder of the torchvision test stub")

    return type(name, (), {"__init__": fail, "__call__": fail})


class _Module(types.ModuleType):
    def __getattr__(self, name: str) -> object:
        if name.startswith("__"):
            raise AttributeError(name)
        value = _placeholder(self.__name__, name)
        setattr(self, name, value)
        return value


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):  # noqa: ANN001
        if fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):  # noqa: ANN001
        module = _Module(spec.name)
        module.__path__ = []
        module.__dict__.update(REAL.get(spec.name, {}))
        return module

    def exec_module(self, module):  # noqa: ANN001
        pass


sys.meta_path.append(_Finder())

"""2:4 pruned Linear layers run through PyTorch's semi-structured sparse kernels.

A 2:4 mask (Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks") makes nothing faster
while the zeros are stored dense. Sparse tensor cores (NVIDIA Ampere and newer, compute
capability >= 8.0) skip them when the weight is compressed to its kept half plus metadata:
``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt, or CUTLASS where cuSPARSELt is missing).
:func:`accelerate_24` swaps each qualifying ``nn.Linear`` weight for that tensor, wrapped in an
``nn.Parameter`` as PyTorch's tutorial does; ``nn.Linear.forward`` then dispatches ``linear`` /
``mm`` / ``addmm`` to the sparse kernel (``torch/sparse/_semi_structured_ops.py``), which pads the
dense input to the kernel's minimum tile itself.

The kernels take only some weights, and the constraints are read from the installed torch
(``_DTYPE_SHAPE_CONSTRAINTS`` of the backend class): float16/bfloat16, ``(out, in)`` both
multiples of (16, 16) on cuSPARSELt and (32, 64) on CUTLASS. float32 (CUTLASS only, as TF32) and
int8/float8 (no ``nn.Linear`` forward of their own) are not taken. A converted model is for
inference: the compressed weight supports matmuls and a few view ops, little else (no
``== 0``), so save the dense model, not the converted one.

Design decision: conversion is all or nothing. Every layer is compressed and, with ``check``,
compared to its dense output before any weight is swapped, so a failing kernel leaves the model
as it was; the cost is that the compressed copies (~56% of those weights) exist beside the dense
ones until the swap.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import KernelUnavailableError
from ..patterns.nm import is_nm

log = logging.getLogger(__name__)

MIN_CAPABILITY = (8, 0)
DTYPES = (torch.float16, torch.bfloat16)
#: largest relative error ||y_kernel - y_dense|| / ||y_dense|| the check accepts: both paths
#: accumulate in float32, so the outputs differ by about one rounding of the output dtype
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 3e-2}
CHECK_TOKENS = 32


def semi_structured_support(device: torch.device | str) -> tuple[bool, str]:
    """Whether 2:4 semi-structured kernels run on ``device``, and why (or why not)."""
    device = torch.device(device)
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return False, f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    if device.type != "cuda":
        return False, f"the model is on {device}, not a CUDA device; place it with --device cuda"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_CAPABILITY:
        return False, (f"compute capability {major}.{minor} < {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} "
                       f"({torch.cuda.get_device_name(device)} has no sparse tensor cores)")
    return True, f"{torch.cuda.get_device_name(device)}, compute capability {major}.{minor}, {backend_name()} backend"


def _backend_class(backend: str | None = None) -> type:
    """The SparseSemiStructuredTensor subclass that converts: ``cusparselt`` or ``cutlass``;
    None: the one ``to_sparse_semi_structured`` picks, or CUTLASS where torch lacks cuSPARSELt."""
    cutlass, cslt = torch.sparse.SparseSemiStructuredTensorCUTLASS, torch.sparse.SparseSemiStructuredTensorCUSPARSELT
    if backend is None:
        forced = getattr(torch.sparse.SparseSemiStructuredTensor, "_FORCE_CUTLASS", False)
        return cutlass if forced or not torch.backends.cusparselt.is_available() else cslt
    found = {c.BACKEND: c for c in (cutlass, cslt)}
    if backend not in found:
        raise ValueError(f"unknown semi-structured backend {backend!r}; expected one of {sorted(found)}")
    return found[backend]


def backend_name(backend: str | None = None) -> str:
    return _backend_class(backend).BACKEND


def kernel_constraint(shape: tuple[int, int], dtype: torch.dtype, backend: str | None = None) -> str | None:
    """Why a weight of ``shape`` ``(out, in)`` and ``dtype`` cannot be compressed; None if it can."""
    cls = _backend_class(backend)
    if dtype not in DTYPES:
        return (f"dtype {str(dtype).removeprefix('torch.')}: the 2:4 kernels here take float16 or bfloat16 weights "
                "(load with --dtype bfloat16)")
    c = cls._DTYPE_SHAPE_CONSTRAINTS[dtype]
    rows, cols = shape
    if rows < c.sparse_min_rows or rows % c.sparse_min_rows or cols < c.sparse_min_cols or cols % c.sparse_min_cols:
        return (f"shape ({rows}, {cols}): the {cls.BACKEND} kernel needs (out, in) to be positive multiples of "
                f"({c.sparse_min_rows}, {c.sparse_min_cols}) for {str(dtype).removeprefix('torch.')}")
    return None


def pattern_violation(weight: Tensor) -> str | None:
    """Why ``weight`` ``(out, in)`` is not 2:4 along its input dim (at least 2 zeros in every group
    of 4 consecutive inputs of every row); None when it is."""
    out_f, in_f = weight.shape
    if in_f % 4:
        return f"not 2:4: {in_f} input features are not divisible by 4"
    if is_nm(weight, 2, 4):
        return None
    nonzero = (weight != 0).reshape(out_f, in_f // 4, 4).sum(dim=2)  # (out, in/4)
    bad = (nonzero > 2).nonzero()
    row, group = (int(v) for v in bad[0])
    return (f"not 2:4: {len(bad)} of {nonzero.numel()} groups of 4 inputs keep more than 2 weights "
            f"(first: row {row}, inputs {4 * group}-{4 * group + 3} keep {int(nonzero[row, group])})")


def classify_24(model: nn.Module, backend: str | None = None) -> tuple[list[str], dict[str, str]]:
    """The ``nn.Linear`` layers the 2:4 kernels take, and every other Linear with its reason."""
    from ..patterns.permute import PERMS_ATTR

    users: dict[int, int] = {}
    for m in model.modules():  # a tied weight is also an embedding, which must stay dense
        for p in m._parameters.values():
            if p is not None:
                users[id(p)] = users.get(id(p), 0) + 1
    permuted = model.__dict__.get(PERMS_ATTR) or {}
    ok, skipped = [], {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        w = m.weight
        if isinstance(w, torch.sparse.SparseSemiStructuredTensor):
            skipped[name] = "already a 2:4 semi-structured tensor"
            continue
        reason = pattern_violation(w.detach())
        if reason and name in permuted:
            reason = ("2:4 only over its permuted input order (--permute): a kernel needs x[..., perm], or the "
                      "order folded into the layer that produces x")
        reason = reason or (f"weight is shared with {users[id(w)] - 1} other module(s) (tied); untie it to convert"
                            if users[id(w)] > 1 else None) or kernel_constraint(tuple(w.shape), w.dtype, backend)
        if reason:
            skipped[name] = reason
        else:
            ok.append(name)
    return ok, skipped


def find_24_linears(model: nn.Module, backend: str | None = None) -> list[str]:
    """Names of the ``nn.Linear`` layers whose weight is exactly 2:4 along the input dim and meets
    the kernel's dtype and shape constraints (see :func:`classify_24` for the others' reasons)."""
    return classify_24(model, backend)[0]


def _compress(weight: Tensor) -> Tensor:
    """``weight`` ``(out, in)`` as the SparseSemiStructuredTensor of the backend in use."""
    cls, forced = _backend_class(), getattr(torch.sparse.SparseSemiStructuredTensor, "_FORCE_CUTLASS", False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The PyTorch API of SparseSemiStructuredTensor", UserWarning)
        if cls is torch.sparse.SparseSemiStructuredTensorCUTLASS and not forced:
            return cls.from_dense(weight.contiguous())  # what to_sparse_semi_structured would do, without a global flag
        return torch.sparse.to_sparse_semi_structured(weight.contiguous())


def _check(name: str, lin: nn.Linear, sparse: Tensor) -> float:
    """Relative error of the kernel's output against the dense layer's on a random input
    ``(2, CHECK_TOKENS // 2, in)``; raises KernelUnavailableError past the dtype's tolerance."""
    w = lin.weight
    gen = torch.Generator(device=w.device).manual_seed(0)
    x = torch.randn(2, CHECK_TOKENS // 2, w.shape[1], generator=gen, device=w.device, dtype=w.dtype)
    dense = nn.functional.linear(x, w, lin.bias).float()
    got = nn.functional.linear(x, sparse, lin.bias).float()
    err = float((got - dense).norm() / dense.norm().clamp_min(1e-12))
    if not err <= TOLERANCE[w.dtype]:
        raise KernelUnavailableError(
            f"the 2:4 {backend_name()} kernel gives a different result for {name}: relative error {err:.3g} > "
            f"{TOLERANCE[w.dtype]:g} ({str(w.dtype).removeprefix('torch.')}); the model was left dense. "
            "Run without 2:4 kernels (--sparse-kernels off) and report the torch and CUDA versions")
    return err


@torch.no_grad()
def accelerate_24(model: nn.Module, *, check: bool = True) -> dict[str, Any]:
    """Swap, in place, every Linear weight :func:`find_24_linears` names for its
    ``to_sparse_semi_structured`` compression. With ``check``, each converted layer's output on
    a random input must match its dense output first (relative error within ``TOLERANCE``).

    Returns ``{"converted": [names], "skipped": {name: reason}, "backend": ..., "device": ...}``
    (with ``check``, also ``"max_rel_error"``). Raises KernelUnavailableError on a device without
    the kernels, or when a kernel's output differs (then no weight has been swapped)."""
    converted, skipped = classify_24(model)
    modules = dict(model.named_modules())
    devices = {modules[n].weight.device for n in converted} or {next(model.parameters()).device}
    for device in devices:
        ok, why = semi_structured_support(device)
        if not ok:
            raise KernelUnavailableError(f"2:4 semi-structured kernels cannot run: {why}. They need a CUDA GPU of "
                                         "compute capability >= 8.0 (A100, H100, RTX 30xx or newer)")
    compressed, errors = {}, []
    for name in converted:
        lin = modules[name]
        try:
            compressed[name] = _compress(lin.weight.detach())
            if check:
                errors.append(_check(name, lin, compressed[name]))
        except (RuntimeError, NotImplementedError) as exc:  # a kernel or conversion this torch/GPU lacks
            raise KernelUnavailableError(
                f"the 2:4 {backend_name()} kernel failed on {name} {tuple(lin.weight.shape)} "
                f"{str(lin.weight.dtype).removeprefix('torch.')}: {str(exc).splitlines()[0]}; the model was left "
                "dense") from exc
    for name, sparse in compressed.items():
        modules[name].weight = nn.Parameter(sparse, requires_grad=False)
    if not converted:
        log.warning("no Linear layer is in the 2:4 pattern the kernels take; nothing converted (%d skipped)",
                    len(skipped))
    report: dict[str, Any] = {"converted": converted, "skipped": skipped, "backend": backend_name(),
                              "device": ", ".join(sorted(str(d) for d in devices))}
    if check:
        report["max_rel_error"] = max(errors, default=0.0)
    return report


def tensor_bytes(t: Tensor) -> int:
    """Bytes a tensor holds: a wrapper subclass (a compressed 2:4 weight) counts its inner tensors."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None:
        return sum(tensor_bytes(getattr(t, n)) for n in flatten()[0])
    return t.numel() * t.element_size()


__all__ = ["DTYPES", "MIN_CAPABILITY", "TOLERANCE", "accelerate_24", "backend_name", "classify_24", "find_24_linears",
           "kernel_constraint", "pattern_violation", "semi_structured_support", "tensor_bytes"]

"""The rule table and the helpers a rule is written with.

A rule is ``rule(tracer, name, args, kwargs, out)`` for the torch ops it is registered under
(``@rule("op", ...)``): it reads input facets with ``tracer.of(t)``, couples ids that must be
removed together with ``tracer.trace.uf.couple(a, b)``, marks roles with
``tracer.trace.mark(role, ids)`` (``frozen``, ``producers``...) and sets the output's facets
with ``tracer.set(out, facets)``. The helpers here do the common parts: :func:`merge`
(elementwise semantics over several operands), :func:`couple_slices`, :func:`stat` (a
normalisation statistic: removal inexact), :func:`arg` (an argument by position or keyword),
:func:`pad_to` and :func:`is_param`.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ..facets import full, varying

Rule = Callable[..., None]
RULES: dict[str, Rule] = {}


def rule(*names: str) -> Callable[[Rule], Rule]:
    """Register a rule for the torch ops ``names`` (function, method or operator names)."""
    def add(fn: Rule) -> Rule:
        for n in names:
            RULES[n] = fn
        return fn

    return add


_NONE = object()
#: Positional signatures of the ops whose rules read arguments by position: Hugging Face and
#: timm call them with keywords (``F.linear(x, weight=w)``, ``torch.baddbmm(b, batch1=..)``).
SIGNATURES: dict[str, tuple[tuple[str, Any], ...]] = {}


def _signature(names: str, *ops: str) -> None:
    literal = {"None": None, "False": False, "0": 0, "1": 1}
    params = tuple((p.partition("=")[0], literal[p.partition("=")[2]] if "=" in p else _NONE) for p in names.split())
    for op in ops:
        SIGNATURES[op] = params


_signature("input weight bias=None", "linear")
_signature("input weight bias=None stride=1 padding=0 dilation=1 groups=1", "conv1d", "conv2d", "conv3d")
_signature("input weight bias=None stride=1 padding=0 output_padding=0 groups=1 dilation=1",
           "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
_signature("input mat1 mat2", "addmm")
_signature("input batch1 batch2", "baddbmm", "addbmm")
_signature("input other", "matmul", "bmm", "mm")
_signature("input weight", "embedding")
_signature("input running_mean running_var weight=None bias=None training=False", "batch_norm")
_signature("input num_groups weight=None bias=None", "group_norm")
_signature("input normalized_shape weight=None bias=None", "layer_norm")
_signature("input normalized_shape weight=None", "rms_norm")
_signature("query key value", "scaled_dot_product_attention")
_signature("input dim index", "gather")


def bind(name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``args`` with every argument of ``name``'s signature that came by keyword moved to its
    position (defaults filling the gaps), so a rule reading ``args[1]`` sees the weight."""
    params = SIGNATURES.get(name)
    if params is None or not any(p in kwargs for p, _ in params):
        return args, kwargs
    kwargs = dict(kwargs)
    bound = list(args)
    last = max(i for i, (p, _) in enumerate(params) if p in kwargs or i < len(args))
    for i in range(len(bound), last + 1):
        p, default = params[i]
        if p in kwargs:
            bound.append(kwargs.pop(p))
        elif default is not _NONE:
            bound.append(default)
        else:
            raise TypeError(f"{name}() is missing its argument {p!r}")
    return tuple(bound), kwargs


def pad_to(f: Tensor, ndim: int) -> Tensor:
    """``f`` with leading size-1 dims up to ``ndim`` dims (broadcast alignment)."""
    while f.ndim < ndim:
        f = f.unsqueeze(0)
    return f


def arg(args: tuple, kwargs: dict, i: int, key: str, default: Any = None) -> Any:
    """Argument ``key`` given by keyword, or at position ``i``, or ``default``."""
    if key in kwargs:
        return kwargs[key]
    return args[i] if len(args) > i else default


def merge(tr: Any, parts: list[tuple[list[Tensor], bool]], ndim: int) -> list[Tensor]:
    """Elementwise semantics: facets varying along the same dims are the same units.

    ``parts``: per operand, its facets and whether it is a parameter. An activation facet
    varying along a strict subset of another's dims (a per-head gate on per-channel data)
    is coupled with every id of the slice it broadcasts over. A parameter facet in that
    position is shared across units (a per-head-dim norm weight used by all heads): it is
    frozen rather than coupled, so it does not merge the heads.
    """
    acts = sorted(
        (pad_to(f, ndim) for fs, is_param in parts if not is_param for f in fs),
        key=lambda f: -len(varying(f)),
    )
    params = [pad_to(f, ndim) for fs, is_param in parts if is_param for f in fs]
    out: list[Tensor] = []
    for f in acts + params:
        is_param = any(f is p for p in params)
        vf = set(varying(f))
        same = next((r for r in out if set(varying(r)) == vf), None)
        if same is not None:
            tr.trace.uf.couple(same, f)
            continue
        wider = next((r for r in out if vf < set(varying(r))), None)
        if wider is not None:
            if is_param or not vf:
                tr.trace.mark("frozen", f)
            else:
                couple_slices(tr, wider, f)
            continue
        if is_param and acts:
            continue  # e.g. the position axis of a position embedding: not a unit
        out.append(f)
    return out


def couple_slices(tr: Any, wide: Tensor, narrow: Tensor) -> None:
    """Couple each id of ``narrow`` with every id of ``wide`` in the slice it covers."""
    shape = torch.broadcast_shapes(wide.shape, narrow.shape)
    w, n = full(wide, shape), full(narrow, shape)
    keep = varying(narrow)
    order = list(keep) + [d for d in range(len(shape)) if d not in keep]
    rows = [shape[d] for d in keep]
    w = w.permute(order).reshape(int(torch.tensor(rows).prod()) if rows else 1, -1)
    n = n.permute(order).reshape(w.shape[0], -1)[:, :1]
    tr.trace.uf.couple(w, n)


def is_param(tr: Any, t: Any) -> bool:
    """Whether ``t`` is one of the model's weights (not an activation)."""
    return tr.is_weight(t)


def stat(tr: Any, f: Tensor, dims: tuple[int, ...]) -> None:
    """Record the slices a normalisation statistic averages over: removing some units of a
    slice (but not all) changes the statistic, so such removal is inexact."""
    rest = [d for d in range(f.ndim) if d not in dims]
    rows = f.permute(rest + list(dims)).reshape(-1, int(torch.tensor([f.shape[d] for d in dims]).prod()))
    tr.trace.roles["inexact"].append(torch.unique(rows, dim=0))



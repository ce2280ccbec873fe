"""Trace one forward pass and record which units of which parameters are coupled.

The tracer is a ``TorchFunctionMode``: it sees every torch call of one real forward pass
(functions, Tensor methods, operators) with its real arguments, so it works on any model
that runs, including Hugging Face models written with plain tensor code. Each call is
handled by a rule in :mod:`.rules` that moves facets (unit labels, see :mod:`.facets`)
from inputs to outputs and couples ids that must be removed together. A labelled tensor
reaching an op without a rule raises :class:`StructureError` naming the op and the module,
so a graph is never silently wrong and tracing never hangs.

Idea after DepGraph (Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023),
with the dependency rules expressed as label propagation over one real forward pass.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..errors import StructureError, UntraceableOp
from .facets import UnionFind, compress, fresh_like
from .rules.base import bind


@dataclass
class Trace:
    """What one traced forward pass found.

    ``param_ids[name][d]``: ``(size_d,)`` ids of the units along dim ``d`` of parameter or
    buffer ``name`` (None for dims that never carry units). Roles are id sets:
    ``producers`` (outputs of Linear/Conv/Embedding: a unit must make something to be
    removable), ``frozen`` (reaches the model's output, indexes a vocabulary, is selected by
    top-k...), ``inexact`` (feeds a normalisation statistic, so removal is not exactly
    equal to masking), ``kv`` (the key/value side of attention, for query-head sub-units).
    """

    uf: UnionFind = field(default_factory=UnionFind)
    param_ids: dict[str, list[Tensor | None]] = field(default_factory=dict)
    params: dict[str, Tensor] = field(default_factory=dict)
    roles: dict[str, list[Tensor]] = field(
        default_factory=lambda: {"producers": [], "frozen": [], "inexact": [], "kv": [], "heads": []}
    )
    macs: int = 0

    def mark(self, role: str, ids: Tensor | None) -> None:
        if ids is not None:
            self.roles[role].append(ids.reshape(-1))


class Tracer(TorchFunctionMode):
    """Holds facets of live tensors during one forward pass; rules do the work."""

    def __init__(self, model: nn.Module, rules: dict[str, Callable[..., Any]]) -> None:
        super().__init__()
        self.trace = Trace()
        self.rules = rules
        self.facets: dict[int, list[Tensor]] = {}
        self.alive: list[Tensor] = []  # keeps traced tensors alive so ids are not reused
        self.names: dict[int, str] = {}
        for name, t in model.named_parameters(remove_duplicate=True):
            self.names.setdefault(id(t), name)
        # a convolution kernel's spatial dims are never units (labelling them would couple every
        # input channel once a standardised weight is flattened to (1, out, in*k*k))
        self.spatial = {id(m.weight) for m in model.modules()
                        if isinstance(m, nn.modules.conv._ConvNd) and isinstance(m.weight, Tensor)}
        # Buffers carry units only where a rule asks (BatchNorm running statistics); the
        # rest (rotary frequencies, position ids, masks) are constants, not units.
        self.buffers = {id(t): name for name, t in model.named_buffers(remove_duplicate=True)}
        self.module_stack: list[str] = []
        self.data: set[int] = set()  # tensors computed from the model's inputs
        self.opaque_depth = 0  # > 0 inside a module traced as a black box
        self.qualnames = {id(m): n for n, m in model.named_modules()}

    # --- facets of tensors -------------------------------------------------------------
    def of(self, t: Any, buffer: bool = False) -> list[Tensor]:
        """The facets of ``t``; parameters (and, if asked, buffers) get one fresh facet per dim
        at first use."""
        if not isinstance(t, Tensor):
            return []
        if id(t) in self.facets:
            return self.facets[id(t)]
        name = self.names.get(id(t)) or (self.buffers.get(id(t)) if buffer else None)
        if name is None:
            return []
        uf, ids = self.trace.uf, []
        facets = []
        for d in range(t.ndim):
            if t.shape[d] > 1 and not (d >= 2 and id(t) in self.spatial):
                f = fresh_like(tuple(t.shape), d, uf.new(t.shape[d]))
                ids.append(f.reshape(-1))
                facets.append(f)
            else:
                ids.append(None)
        self.trace.param_ids[name] = ids
        self.trace.params[name] = t
        self.set(t, facets)
        return facets

    def set(self, t: Any, facets: list[Tensor | None]) -> None:
        if isinstance(t, Tensor):
            kept = [c for f in facets if f is not None and (c := compress(f)) is not None]
            self.facets[id(t)] = kept
            self.alive.append(t)

    def is_weight(self, t: Any) -> bool:
        """A parameter, a buffer, or a tensor computed from them without the model's inputs
        (``1 + w.float()``): its facets are shared weights, not units of data."""
        return isinstance(t, Tensor) and id(t) not in self.data

    def where(self) -> str:
        return (self.module_stack[-1] if self.module_stack else "") or "<model>"

    def module(self) -> str:
        """The innermost module running now ('' at the model's top level)."""
        where = self.where()
        return "" if where == "<model>" else where

    # --- the mode --------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = op_name(func)
        if self.opaque_depth:
            self.trace.macs += opaque_macs(name, args, kwargs, out)
            return out
        rule = self.rules.get(name)
        args, kwargs = bind(name, args, kwargs)
        if any(id(t) in self.data for t in tensors_in(args, kwargs)):
            for o in [out] if isinstance(out, Tensor) else (out if isinstance(out, (list, tuple)) else []):
                if isinstance(o, Tensor):
                    self.data.add(id(o))
                    self.alive.append(o)
        if rule is not None:
            try:
                rule(self, name, args, kwargs, out)
            except UntraceableOp:
                raise
            except StructureError as exc:
                raise UntraceableOp(str(exc), name, self.module()) from exc
            except Exception as exc:  # noqa: BLE001 - a call form the rule does not know: say so, never crash
                raise UntraceableOp(f"the coupling rule for op {name!r} (in module {self.where()!r}) cannot "
                                    f"follow this call ({type(exc).__name__}: {exc})", name, self.module()) from exc
        elif any(self.of(t) for t in tensors_in(args, kwargs)) and has_tensor(out):
            raise UntraceableOp(f"cannot trace op {name!r} (in module {self.where()!r}) on tensors that carry "
                                "prunable channels; prunekit has no coupling rule for it", name, self.module())
        return out


def opaque_macs(name: str, args: tuple, kwargs: dict, out: Any) -> int:
    """MACs of a product inside a black box (no units traced there, but the work is counted)."""
    if not isinstance(out, Tensor) or len(args) < 2:
        return 0
    a, b = args[0], args[1] if "weight" not in kwargs else kwargs["weight"]
    if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
        return 0
    if name == "linear":
        return out.numel() * b.shape[-1]
    if name in ("conv1d", "conv2d", "conv3d"):
        return out.numel() * b[0].numel()
    if name in ("matmul", "bmm", "mm", "__matmul__") and a.ndim >= 1:
        return out.numel() * a.shape[-1]
    return 0


def op_name(func: Any) -> str:
    """A stable name for a torch callable: ``view``, ``linear``, ``__add__``, ``T``..."""
    name = getattr(func, "__name__", None) or repr(func)
    if name in ("__get__", "__set__"):
        owner = getattr(func, "__self__", None)
        name = getattr(owner, "__name__", name)
    return name


def tensors_in(args: Any, kwargs: dict[str, Any]) -> Iterator[Tensor]:
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (x for x in a if isinstance(x, Tensor))


def has_tensor(out: Any) -> bool:
    if isinstance(out, Tensor):
        return True
    return isinstance(out, (list, tuple)) and any(isinstance(x, Tensor) for x in out)


def walk_tensors(obj: Any) -> Iterator[Tensor]:
    """Every tensor inside a model output (tensors, tuples, lists, dicts, ModelOutput)."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from walk_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from walk_tensors(v)


def trace_model(model: nn.Module, inputs: Any, rules: dict[str, Callable[..., Any]],
                opaque: tuple[str, ...] = ()) -> Trace:
    """Run ``model(**inputs)`` (dict) or ``model(*inputs)`` (tuple) or ``model(inputs)`` once
    under the tracer and return the coupling it found. Outputs' units are frozen.

    ``opaque``: regexes of module names traced as black boxes: the units entering them are
    frozen, nothing inside is traced, their outputs carry no units (an LSTM, a custom kernel).
    """
    tracer = Tracer(model, rules)
    patterns = [re.compile(p) for p in opaque]

    def enter(module: nn.Module, args: Any) -> None:
        # a module outside the model (a kernel wrapper transformers builds per call) is part of its caller
        name = tracer.qualnames.get(id(module), tracer.module_stack[-1] if tracer.module_stack else "")
        tracer.module_stack.append(name)
        if tracer.opaque_depth or any(p.search(name) for p in patterns):
            if not tracer.opaque_depth:
                for t in walk_tensors(args):
                    for f in tracer.of(t):
                        tracer.trace.mark("frozen", f)
            tracer.opaque_depth += 1

    def leave(module: nn.Module, args: Any, out: Any) -> None:
        if tracer.module_stack:
            tracer.module_stack.pop()
        if tracer.opaque_depth:
            tracer.opaque_depth -= 1

    handles = [
        torch.nn.modules.module.register_module_forward_pre_hook(enter),
        torch.nn.modules.module.register_module_forward_hook(leave),
    ]
    leaves = list(walk_tensors(inputs))
    tracer.data.update(id(t) for t in leaves)
    tracer.alive.extend(leaves)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), tracer:
            if isinstance(inputs, dict):
                out = model(**inputs)
            elif isinstance(inputs, tuple):
                out = model(*inputs)
            else:
                out = model(inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for t in walk_tensors(out):
        for f in tracer.of(t):
            tracer.trace.mark("frozen", f)
    return tracer.trace

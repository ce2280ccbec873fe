"""The dependency graph: groups of coupled units, built from one traced forward pass.

A *unit* is one connected component of coupled ids: removing it removes, in every member
parameter, the slices along the dims its ids label (a conv's output channel together with
its BatchNorm entries, the next conv's input channel and whatever a residual add ties to
it). Units with the same members (same parameters, dims and slice counts) form a *group*:
one layer's MLP neurons, one attention layer's heads, one residual stream's channels.
A group's units are interchangeable candidates for the same allocation.
"""
from __future__ import annotations

import logging
import os
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ..errors import UntraceableOp
from .rules import RULES
from .trace import Trace, trace_model

Kind = Literal["channels", "neurons", "heads", "width"]
log = logging.getLogger(__name__)


@dataclass(slots=True, unsafe_hash=True)
class Member:
    """Slices ``index`` along ``dim`` of parameter ``param`` belong to the unit. Not frozen
    (treat it as read-only): a graph holds one per unit and parameter, and a frozen
    dataclass costs several times more to create."""

    param: str
    dim: int
    index: tuple[int, ...]


@dataclass
class Group:
    """Interchangeable units of one coupled structure.

    ``units``: one tuple of :class:`Member` per unit. ``kind``: channels (conv), neurons
    (Linear hidden units), heads (attention; a unit is one key/value head with its query
    heads), or width (a residual stream: embedding/hidden width). ``inexact``: removing a
    unit changes a normalisation statistic, so the pruned model is close to, not equal to,
    the masked one (for heads: removing a key/value group or one of its query heads).
    ``sub_units`` (heads with grouped-query attention): per unit, its query heads as member
    tuples, for query-head pruning. A heads group may have a single unit (one key/value head
    shared by every query head, as in Gemma 3): only its query heads can go.
    """

    name: str
    kind: Kind
    units: list[tuple[Member, ...]]
    inexact: bool = False
    sub_units: list[list[tuple[Member, ...]]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.units)

    @property
    def params(self) -> list[str]:
        return sorted({m.param for m in self.units[0]})


@dataclass
class Graph:
    """All prunable groups of a model plus what the trace measured."""

    groups: list[Group]
    macs: int
    seconds: float
    trace: Trace
    black_boxes: list[dict[str, str]] = field(default_factory=list)

    def of_kind(self, *kinds: str) -> list[Group]:
        return [g for g in self.groups if g.kind in kinds]

    def summary(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for g in self.groups:
            counts[g.kind] += 1
        return dict(counts)


def build_graph(model: nn.Module, inputs: Any, *, ignore: tuple[str, ...] = (), auto_box: bool = True) -> Graph:
    """Trace ``model`` on ``inputs`` once and return its groups of coupled units.

    ``ignore``: regexes of module names to treat as black boxes; every unit touching one of
    their parameters or inputs stays (e.g. an LSTM, or a classifier head you want whole).
    ``auto_box``: when an op inside a module cannot be traced (no rule, or a rule that refuses
    it), that module, in every block, becomes a black box and tracing starts again; the
    graph lists each in ``black_boxes`` (pattern, op, reason), so what stays whole is named.
    Without it, the error names the op and the ``ignore`` pattern that would box it.
    """
    start = time.perf_counter()
    opaque, boxes = list(ignore), []
    while True:
        try:
            trace = trace_model(model, inputs, RULES, opaque=tuple(opaque))
            break
        except UntraceableOp as exc:
            pattern = every_block(exc.module) if exc.module else None
            if not auto_box or pattern is None or pattern in opaque or len(boxes) >= MAX_BOXES:
                raise UntraceableOp(f"{exc}; {box_hint(exc.module)}", exc.op, exc.module) from exc
            opaque.append(pattern)
            boxes.append({"modules": pattern, "op": exc.op, "reason": str(exc)})
            log.warning("structure: %s cannot be traced (op %r); treating it as a black box (left whole)",
                        pattern, exc.op)
    groups = groups_from_trace(trace, model, tuple(opaque))
    return Graph(groups, trace.macs, time.perf_counter() - start, trace, boxes)


#: how many distinct modules may become black boxes before the trace gives up
MAX_BOXES = 16


def every_block(module: str) -> str:
    """A regex matching ``module`` in every block (and every expert): numeric path parts become
    ``\\d+`` (``model.layers.0.mlp`` -> ``^model\\.layers\\.\\d+\\.mlp$``)."""
    parts = [r"\d+" if p.isdigit() else re.escape(p) for p in module.split(".")]
    return "^" + r"\.".join(parts) + "$"


def box_hint(module: str) -> str:
    """The fix, in both interfaces' syntax, covering the module in every block."""
    if not module:
        return ("the op runs at the model's top level: move it into a submodule and leave that whole with "
                "ignore=[...], or register a rule in prunekit.structural.rules.RULES")
    pattern = every_block(module)
    return (f"to prune the rest, leave that module whole in every block: ignore=[r'{pattern}'] "
            f"(CLI: --ignore '{pattern}'), or register a rule in prunekit.structural.rules.RULES")


def _ids_of(trace: Trace, role: str) -> np.ndarray:
    parts = trace.roles[role]
    return torch.cat(parts).numpy() if parts else np.zeros(0, dtype=np.int64)


def groups_from_trace(trace: Trace, model: nn.Module, ignore: tuple[str, ...] = ()) -> list[Group]:
    roots = trace.uf.roots()
    sub_roots = trace.uf.roots(skip=frozenset({"kv"}))
    role = {r: set(roots[_ids_of(trace, r)].tolist()) for r in ("producers", "frozen", "heads")}
    role["inexact"] = _inexact(trace, roots)
    sub_inexact = _inexact(trace, sub_roots)  # a norm over several query heads of one group
    kv_sub = set(sub_roots[_ids_of(trace, "kv")].tolist())
    eligible = np.zeros(trace.uf.size, dtype=bool)
    eligible[list(role["producers"] - role["frozen"])] = True
    members: dict[int, list[Member]] = defaultdict(list)
    subs: dict[int, dict[int, list[Member]]] = defaultdict(lambda: defaultdict(list))
    for name, dims in trace.param_ids.items():
        for d, ids in enumerate(dims):
            if ids is None:
                continue
            comp, sub = roots[ids.numpy()], sub_roots[ids.numpy()]
            pos = np.nonzero(eligible[comp])[0]
            if pos.size and np.unique(comp[pos]).size == pos.size and role["heads"].isdisjoint(comp[pos].tolist()):
                for c, p in zip(comp[pos].tolist(), pos.tolist()):  # one slice per unit: the common case
                    members[c].append(Member(name, d, (p,)))
                continue
            for c, where in _split_by(comp, eligible[comp]):
                members[c].append(Member(name, d, tuple(where.tolist())))
                if c in role["heads"]:
                    for s, idx in _split_by(sub[where], np.ones(len(where), dtype=bool)):
                        if s not in kv_sub:
                            subs[c][s].append(Member(name, d, tuple(where[idx].tolist())))
    frozen_params = {n for n in trace.param_ids if any(re.search(p, n.rpartition(".")[0]) for p in ignore)}
    families: dict[tuple, list[int]] = defaultdict(list)
    for c, ms in members.items():
        if c not in role["producers"] or c in role["frozen"]:
            continue
        if any(m.param in frozen_params for m in ms):
            continue
        families[tuple(sorted((m.param, m.dim, len(m.index)) for m in ms))].append(c)
    modules = dict(model.named_modules())
    order = {name: i for i, name in enumerate(trace.param_ids)}  # first use = execution order
    groups = []
    for comps in families.values():
        comps.sort(key=lambda c: min(m.index[0] for m in members[c]))
        units = [tuple(sorted(members[c], key=lambda m: (m.param, m.dim))) for c in comps]
        kind = _kind(units[0], modules, heads=comps[0] in role["heads"])
        sub_units = _sub_units(comps, subs) if kind == "heads" else []
        if len(comps) < 2 and not sub_units:
            continue  # the only unit cannot go; a single key/value head can still lose query heads
        inexact = any(c in role["inexact"] or not sub_inexact.isdisjoint(subs.get(c, ())) for c in comps)
        groups.append(Group(_name(units[0], order), kind, units, inexact, sub_units))
    counts: dict[str, int] = defaultdict(int)
    for g in groups:
        counts[g.name] += 1
    for g in groups:  # several groups under one module: name each by where it starts
        if counts[g.name] > 1:
            g.name = _name(g.units[0], order, prefix=False)
    groups.sort(key=lambda g: _order(g.name))
    return groups


def _sub_units(comps: list[int], subs: dict[int, dict[int, list[Member]]]) -> list[list[tuple[Member, ...]]]:
    """Per key/value unit, its query heads; empty when every unit has at most one."""
    sub_units = [[tuple(v) for _, v in sorted(subs[c].items())] for c in comps]
    return sub_units if any(len(s) > 1 for s in sub_units) else []


def _split_by(labels: np.ndarray, mask: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """``(label, positions)`` for each distinct label among the masked positions."""
    pos = np.nonzero(mask)[0]
    if pos.size == 0:
        return []
    order = pos[np.argsort(labels[pos], kind="stable")]
    sorted_labels = labels[order]
    bounds = np.flatnonzero(np.diff(sorted_labels)) + 1
    starts = np.r_[0, bounds]
    return [(int(sorted_labels[i]), part) for i, part in zip(starts, np.split(order, bounds))]


def _inexact(trace: Trace, roots: np.ndarray) -> set[int]:
    """Units that share a normalisation statistic with other units."""
    out: set[int] = set()
    for rows in trace.roles["inexact"]:
        r = roots[rows.numpy()]
        mixed = (r != r[:, :1]).any(axis=1)
        out.update(np.unique(r[mixed]).tolist())
    return out


def _kind(unit: tuple[Member, ...], modules: dict[str, nn.Module], heads: bool) -> Kind:
    if heads:
        return "heads"
    owners = [o for m in unit if (o := modules.get(m.param.rpartition(".")[0])) is not None]
    if any(isinstance(o, nn.Embedding) or _is_layer_norm(o) for o in owners):
        return "width"
    if any(isinstance(o, nn.modules.conv._ConvNd) for o in owners):
        return "channels"
    return "neurons"


def _is_layer_norm(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm and their look-alikes (any '*Norm' but BatchNorm): they normalise
    over the hidden width of a residual stream."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return False
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()


def _name(unit: tuple[Member, ...], order: dict[str, int], prefix: bool = True) -> str:
    """The longest module prefix the unit's parameters share; for a structure spread over
    the model (a CNN's residual channels), the first module whose output it is."""
    common = os.path.commonprefix([m.param.split(".")[:-1] for m in unit]) if prefix else []
    if common:
        return ".".join(common)
    outputs = [m.param for m in unit if m.dim == 0 and m.param.endswith(".weight")] or [unit[0].param]
    first = min(outputs, key=lambda p: order.get(p, 0))
    return first.rpartition(".")[0] + "+"


def _order(name: str) -> tuple:
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in name.split("."))

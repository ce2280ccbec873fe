"""Coupling rules for layers with weights and products of activations: Linear, Conv,
BatchNorm/LayerNorm/RMSNorm, Embedding, matmul, scaled-dot-product attention, MoE grouped_mm.
They register into :data:`prunekit.structural.rules.RULES`."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ...errors import StructureError
from ..facets import full, varying
from .base import arg, is_param, merge, pad_to, rule, stat


# --- layers with weights ------------------------------------------------------------------------
def _param_axis(tr: Any, w: Tensor, dim: int, buffer: bool = False) -> Tensor | None:
    """The ids along ``dim`` of a weight (a parameter, or a tensor sliced from one)."""
    for f in tr.of(w, buffer):
        f = pad_to(f, w.ndim)
        if varying(f) == (dim,):
            return f.reshape(-1)
    return None


@rule("linear")
def linear(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    x, w = args[0], args[1]
    b = arg(args, kwargs, 2, "bias")
    w_out, w_in = _param_axis(tr, w, 0), _param_axis(tr, w, 1)
    tr.trace.macs += out.numel() * w.shape[1]
    _contract(tr, x, w_in, -1)
    _emit(tr, x, out, w_out, b, x.ndim - 1)


def _emit(tr: Any, x: Tensor, out: Tensor, w_out: Tensor | None, bias: Any, dim: int) -> None:
    """The output of a layer: ``x``'s facets not along ``dim``, plus the weight's output ids
    along ``dim`` (which produce units), coupled with the bias."""
    facets = [f for f in tr.of(x) if dim not in varying(pad_to(f, x.ndim))]
    if w_out is not None:
        tr.trace.mark("producers", w_out)
        if bias is not None and (b_ids := _param_axis(tr, bias, 0)) is not None:
            tr.trace.uf.couple(w_out, b_ids)
        shape = [1] * out.ndim
        shape[dim] = -1
        facets.append(w_out.view(shape))
    tr.set(out, facets)


def _contract(tr: Any, x: Tensor, ids: Tensor | None, dim: int) -> None:
    """Couple the units of ``x`` along ``dim`` with the weight's input ids ``(in,)``."""
    dim = dim % x.ndim
    for f in tr.of(x):
        f = pad_to(f, x.ndim)
        if dim in varying(f) and ids is not None:
            shape = [1] * x.ndim
            shape[dim] = -1
            tr.trace.uf.couple(f, ids.view(shape))
        elif dim in varying(f):
            tr.trace.mark("frozen", f)


@rule("conv1d", "conv2d", "conv3d")
def conv(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    x, w = args[0], args[1]
    b = arg(args, kwargs, 2, "bias")
    groups = int(arg(args, kwargs, 6, "groups", 1))
    w_out, w_in = _param_axis(tr, w, 0), _param_axis(tr, w, 1)
    tr.trace.macs += out.numel() * w[0].numel()
    if groups == 1:
        _contract(tr, x, w_in, 1)
    elif w_out is not None:
        opg, ipg = w.shape[0] // groups, w.shape[1]
        outs = w_out.view(groups, opg)
        if ipg == 1:
            # depthwise: input channel c is one unit with the outputs of its group
            tr.trace.uf.couple(outs, outs[:, :1])
            _contract(tr, x, outs[:, 0], 1)
        else:
            # position i of every group is one unit (the group count stays): inputs j*ipg+i
            # with the weight's input index i; outputs j*opg+i together
            tr.trace.uf.couple(outs, outs[:1, :])
            if w_in is not None:
                _contract(tr, x, w_in.repeat(groups), 1)
    _emit(tr, x, out, w_out, b, 1)


@rule("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def conv_transpose(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    x, w = args[0], args[1]
    b = arg(args, kwargs, 2, "bias")
    if int(arg(args, kwargs, 6, "groups", 1)) != 1:
        raise StructureError(f"grouped {name} is not supported (in {tr.where()!r}); exclude it with ignore=[...]")
    w_in, w_out = _param_axis(tr, w, 0), _param_axis(tr, w, 1)
    tr.trace.macs += x.numel() * w[0].numel()
    _contract(tr, x, w_in, 1)
    _emit(tr, x, out, w_out, b, 1)


def _channel_params(tr: Any, x: Tensor, params: list[Any], dim: int, out: Tensor) -> None:
    """Per-channel parameters (norm scale/shift, running stats) along ``dim`` of ``x``."""
    shape = [1] * x.ndim
    shape[dim] = -1
    parts = [(tr.of(x), False)]
    for p in params:
        if isinstance(p, Tensor) and (ids := _param_axis(tr, p, 0, buffer=True)) is not None:
            parts.append(([ids.view(shape)], True))
    tr.set(out, merge(tr, parts, x.ndim))


@rule("batch_norm", "instance_norm")
def batch_norm(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    """Per-channel scale and shift along dim 1. Without running statistics (training mode,
    instance norm, or a weight standardised with ``batch_norm(w.reshape(1, out, -1))`` as in
    NFNets' ScaledStdConv) each channel is normalised by a statistic over the other dims: units
    along those dims (a conv's input channels) change it, so their removal is inexact."""
    x = args[0]
    keys = ("running_mean", "running_var", "weight", "bias")
    params = [arg(args, kwargs, i + 1, k) for i, k in enumerate(keys)]
    training = bool(arg(args, kwargs, 5, "training", False)) if name == "batch_norm" else True
    if training or params[0] is None:
        stats_over = tuple(d for d in range(x.ndim) if d != 1) if name == "batch_norm" else tuple(range(2, x.ndim))
        for f in tr.of(x):
            f = pad_to(f, x.ndim)
            if set(varying(f)) & set(stats_over):
                stat(tr, f, stats_over)
    _channel_params(tr, x, params, 1, out)


@rule("group_norm")
def group_norm(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    x = args[0]
    for f in tr.of(x):
        if 1 in varying(pad_to(f, x.ndim)):
            tr.trace.mark("frozen", f)  # channel groups must stay whole and equal
    _channel_params(tr, x, [arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias")], 1, out)


@rule("layer_norm", "rms_norm")
def layer_norm(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    x = args[0]
    shape = arg(args, kwargs, 1, "normalized_shape")
    if len(shape) != 1:
        raise StructureError(f"{name} over {len(shape)} dims is not supported (in {tr.where()!r})")
    for f in tr.of(x):
        if x.ndim - 1 in varying(pad_to(f, x.ndim)):
            stat(tr, pad_to(f, x.ndim), (x.ndim - 1,))
    keys = ("weight", "bias") if name == "layer_norm" else ("weight",)
    _channel_params(tr, x, [arg(args, kwargs, i + 2, k) for i, k in enumerate(keys)], x.ndim - 1, out)


@rule("embedding")
def embedding(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    w = arg(args, kwargs, 1, "weight")
    vocab, dim = _param_axis(tr, w, 0), _param_axis(tr, w, 1)
    tr.trace.mark("frozen", vocab)
    if dim is not None:
        tr.trace.mark("producers", dim)
        tr.set(out, [dim.view(*([1] * (out.ndim - 1)), -1)])


# --- products of two activations ------------------------------------------------------------
@rule("matmul", "bmm", "__matmul__", "__rmatmul__", "mm")
def matmul(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    a, b = (args[1], args[0]) if name == "__rmatmul__" else (args[0], args[1])
    if a.ndim < 2 or b.ndim < 2:
        if tr.of(a) or tr.of(b):
            raise StructureError(f"{name} of a vector with unit axes is not supported (in {tr.where()!r})")
        return
    tr.trace.macs += out.numel() * a.shape[-1]
    nd = out.ndim
    fa = [pad_to(f, a.ndim) for f in tr.of(a)]
    fb = [pad_to(f, b.ndim) for f in tr.of(b)]
    batch = set(range(nd - 2))
    # contraction: a's last dim against b's second-to-last
    for f in fa:
        if a.ndim - 1 in varying(f) and not (set(varying(f)) - {a.ndim - 1}):
            for g in fb:
                if b.ndim - 2 in varying(g) and not (set(varying(g)) - {b.ndim - 2}):
                    tr.trace.uf.couple(f.reshape(-1), g.reshape(-1))
    facets: list[Tensor] = []
    tagged = [(f, False) for f in fa] + [(g, True) for g in fb]
    heads = [(pad_to(f, nd), is_b) for f, is_b in tagged if set(varying(pad_to(f, nd))) & batch]
    if heads:
        # A batch axis that carries units (attention heads): each operand's batch slice is one
        # unit; the query side couples with the key/value side with kind "kv".
        shape = torch.broadcast_shapes(*(h.shape[:-2] for h, _ in heads))
        reps: dict[bool, Tensor] = {}
        for h, is_b in heads:
            s = full(h, (*shape, h.shape[-2], h.shape[-1])).reshape(*shape, -1)
            rep = reps.setdefault(is_b, s[..., :1])
            tr.trace.uf.couple(s, rep)
            tr.trace.mark("heads", s)
            if is_b and False in reps:
                tr.trace.mark("kv", s)
        if len(reps) == 2:
            tr.trace.uf.couple(reps[False], reps[True], kind="kv")
        # an operand with units but none along the batch axes: one head shared by all of them
        for f, is_b in tagged:
            if (not is_b) in reps and not set(varying(pad_to(f, nd))) & batch and not is_param(tr, b if is_b else a):
                _shared_head(tr, f, reps[not is_b])
        facets.append(next(iter(reps.values())).unsqueeze(-1))
    if not heads:
        for f in fa:
            if varying(f) == (a.ndim - 2,):
                facets.append(pad_to(f[..., :, :1], nd))
        for g in fb:
            if varying(g) == (b.ndim - 1,):
                if is_param(tr, b):
                    tr.trace.mark("producers", g)
                facets.append(pad_to(g[..., :1, :], nd))
        for f in fa:
            if a.ndim - 1 in varying(f) and set(varying(f)) - {a.ndim - 1}:
                raise StructureError(f"{name} mixes unit axes (in {tr.where()!r})")
    tr.set(out, facets)


def _shared_head(tr: Any, f: Tensor, heads: Tensor) -> None:
    """One key/value head broadcast over every query head (multi-query attention, or
    ``repeat_kv``'s expand of a single head): its ids ``f`` are one unit, coupled with each
    query head of ``heads`` ``(..., H, 1)`` with kind "kv", as scaled_dot_product_attention does."""
    ids = f[f >= 0]  # (n,), without padding
    if ids.numel() == 0:
        return
    tr.trace.uf.couple(ids, ids[:1])
    tr.trace.uf.couple(heads.reshape(-1), ids[:1], kind="kv")
    tr.trace.mark("heads", ids)
    tr.trace.mark("kv", ids)


@rule("addmm", "baddbmm", "addbmm")
def addmm(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    bias, m1, m2 = args[0], args[1], args[2]
    tmp = torch.empty(out.shape)
    matmul(tr, "matmul", (m1, m2), {}, tmp)
    parts = [(tr.of(tmp), False), (tr.of(bias), is_param(tr, bias))]
    if is_param(tr, m2) and (ids := _param_axis(tr, m2, 1)) is not None and (bi := _param_axis(tr, bias, 0)) is not None:
        tr.trace.uf.couple(ids, bi)
        parts = [(tr.of(tmp), False)]
    tr.set(out, merge(tr, parts, out.ndim))


@rule("scaled_dot_product_attention")
def sdpa(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    """q ``(..., H, T, D)``, k ``(..., Hk, S, D)``, v ``(..., Hk, S, Dv)``: a query head is one
    unit with its output; a key/value head is one unit; they couple with kind ``kv``."""
    q, k, v = args[0], args[1], args[2]
    tr.trace.macs += q.numel() * k.shape[-2] + out.numel() * k.shape[-2]
    heads_q, heads_k = q.shape[-3], k.shape[-3]
    rep = heads_q // heads_k
    uf = tr.trace.uf

    def per_head(x: Tensor) -> list[Tensor]:
        return [full(f, x.shape).movedim(-3, 0).reshape(x.shape[-3], -1) for f in tr.of(x)]

    qh, kh, vh = per_head(q), per_head(k), per_head(v)
    for h in qh:
        uf.couple(h, h[:, :1])
        tr.trace.mark("heads", h)
    kv = kh + vh
    for h in kv:
        uf.couple(h, kv[0][:, :1])
        tr.trace.mark("kv", h)
        tr.trace.mark("heads", h)
    if qh and kv:
        uf.couple(qh[0][:, :1], kv[0][:, :1].repeat_interleave(rep, 0), kind="kv")
    rep_ids = qh[0][:, 0] if qh else (kv[0][:, 0].repeat_interleave(rep) if kv else None)
    if rep_ids is not None:
        shape = [1] * out.ndim
        shape[-3] = -1
        tr.set(out, [rep_ids.view(shape)])


@rule("_grouped_mm", "grouped_mm")
def grouped_mm(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    """Mixture-of-experts matmul: tokens ``(N, in)`` sorted by expert times per-expert weights
    ``(E, in, out)``. Expert ``e``'s rows are not separate units here (see experts.py)."""
    x, w = args[0], args[1]
    if x.ndim != 2 or w.ndim != 3:
        raise StructureError(f"{name} with input {tuple(x.shape)} and weight {tuple(w.shape)} is not supported")
    tr.trace.macs += out.numel() * x.shape[-1]
    w_in, w_out = _param_axis(tr, w, 1), _param_axis(tr, w, 2)
    _contract(tr, x, w_in, -1)
    if w_out is not None:
        tr.trace.mark("producers", w_out)
        tr.set(out, [w_out.view(1, -1)])

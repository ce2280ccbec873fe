"""Coupling rules: how each torch op moves unit labels (facets) and couples them.

A rule is ``rule(tracer, name, args, kwargs, out)``; it reads input facets with
``tracer.of(t)``, couples ids with ``tracer.trace.uf.couple(...)`` and sets the output's
facets with ``tracer.set(out, facets)``. One table, :data:`RULES`, maps op names to rules.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import StructureError
from .facets import full, varying

Rule = Callable[..., None]
RULES: dict[str, Rule] = {}


def rule(*names: str) -> Callable[[Rule], Rule]:
    def add(fn: Rule) -> Rule:
        for n in names:
            RULES[n] = fn
        return fn

    return add


def _pad(f: Tensor, ndim: int) -> Tensor:
    while f.ndim < ndim:
        f = f.unsqueeze(0)
    return f


def _arg(args: tuple, kwargs: dict, i: int, key: str, default: Any = None) -> Any:
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
        (_pad(f, ndim) for fs, is_param in parts if not is_param for f in fs),
        key=lambda f: -len(varying(f)),
    )
    params = [_pad(f, ndim) for fs, is_param in parts if is_param for f in fs]
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
                _couple_slices(tr, wider, f)
            continue
        if is_param and acts:
            continue  # e.g. the position axis of a position embedding: not a unit
        out.append(f)
    return out


def _couple_slices(tr: Any, wide: Tensor, narrow: Tensor) -> None:
    """Couple each id of ``narrow`` with every id of ``wide`` in the slice it covers."""
    shape = torch.broadcast_shapes(wide.shape, narrow.shape)
    w, n = full(wide, shape), full(narrow, shape)
    keep = varying(narrow)
    order = list(keep) + [d for d in range(len(shape)) if d not in keep]
    rows = [shape[d] for d in keep]
    w = w.permute(order).reshape(int(torch.tensor(rows).prod()) if rows else 1, -1)
    n = n.permute(order).reshape(w.shape[0], -1)[:, :1]
    tr.trace.uf.couple(w, n)


def _is_param(tr: Any, t: Any) -> bool:
    return tr.is_weight(t)


# --- shape-preserving ------------------------------------------------------------------
IDENTITY = (
    "float double half bfloat16 to type type_as contiguous clone detach cpu cuda "
    "requires_grad_ relu relu_ relu6 gelu silu sigmoid tanh neg __neg__ abs exp log sqrt "
    "rsqrt erf square reciprocal sign dropout dropout1d dropout2d alpha_dropout hardtanh "
    "hardswish hardsigmoid leaky_relu elu selu celu softplus mish sin cos exp2 log1p "
    "isnan isinf isfinite logical_not __invert__ bool long int round floor ceil gelu_ "
    "silu_ sigmoid_ tanh_ nan_to_num pow_ sqrt_ exp_ __abs__"
).split()


@rule(*IDENTITY)
def identity(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    if isinstance(out, Tensor) and isinstance(args[0], Tensor):
        tr.set(out, list(tr.of(args[0])))


ELEMENTWISE = (
    "add sub mul div true_divide floor_divide remainder fmod pow maximum minimum where "
    "masked_fill clamp clip lerp addcmul addcdiv eq ne lt le gt ge logical_and logical_or "
    "__add__ __radd__ __iadd__ __sub__ __rsub__ __isub__ __mul__ __rmul__ __imul__ "
    "__truediv__ __rtruediv__ __itruediv__ __div__ __pow__ __rpow__ __and__ __or__ "
    "__eq__ __ne__ __lt__ __le__ __gt__ __ge__ __floordiv__ __mod__ add_ sub_ mul_ div_ "
    "masked_fill_ clamp_ copysign hypot atan2 xlogy rsub"
).split()


@rule(*ELEMENTWISE)
def elementwise(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    if not isinstance(out, Tensor):
        return
    ops = [a for a in list(args) + list(kwargs.values()) if isinstance(a, Tensor)]
    parts = [(tr.of(a), _is_param(tr, a)) for a in ops]
    if any(fs for fs, _ in parts):
        tr.set(out, merge(tr, parts, out.ndim))


@rule("copy_")
def copy(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    tr.set(out, list(tr.of(args[1])))


# --- shape-moving: run the same op on the ids --------------------------------------------
INDEX = (
    "view reshape permute transpose t T mT flatten unflatten squeeze unsqueeze expand "
    "expand_as repeat repeat_interleave narrow select __getitem__ split chunk unbind "
    "tensor_split flip roll movedim moveaxis swapaxes swapdims view_as reshape_as "
    "index_select gather take_along_dim diagonal tril triu unfold masked_select"
).split()


@rule(*INDEX)
def index(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    x = args[0]
    facets = tr.of(x)
    if not facets:
        return
    moved = [func_on_ids(name, full(f, x.shape), args, kwargs) for f in facets]
    if isinstance(out, Tensor):
        tr.set(out, moved)
    else:
        for i, o in enumerate(out):
            tr.set(o, [m[i] for m in moved])


def func_on_ids(name: str, ids: Tensor, args: tuple, kwargs: dict) -> Any:
    if name in ("T", "mT"):
        return getattr(ids, name)
    if name == "gather":  # torch.gather(x, dim, index)
        return torch.gather(ids, args[1], args[2])
    return getattr(torch.Tensor, name)(ids, *args[1:], **kwargs)


@rule("pad")
def pad(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    x = args[0]
    widths = _arg(args, kwargs, 1, "pad")
    tr.set(out, [F.pad(full(f, x.shape), widths, value=-1) for f in tr.of(x)])


@rule("__setitem__")
def setitem(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    x, idx, value = args[0], args[1], args[2]
    fx, fv = tr.of(x), tr.of(value)
    if not fv:
        return
    if len(fx) > 1 or len(fv) > 1:
        raise StructureError(f"cannot trace __setitem__ with several unit axes (in {tr.where()!r})")
    ids = full(fx[0], x.shape) if fx else torch.full(tuple(x.shape), -1, dtype=torch.int64)
    ids[idx] = full(fv[0], ids[idx].shape) if isinstance(value, Tensor) else -1
    tr.set(x, [ids])


@rule("index_add_", "index_add", "index_copy_", "index_copy", "scatter_add_", "scatter_add",
      "index_put_", "index_put")
def scatter(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    x = args[0]
    src = next((a for a in reversed(args[1:]) if isinstance(a, Tensor) and tr.of(a)), None)
    if src is None:
        if tr.of(x):
            tr.set(out, list(tr.of(x)))
        return
    dim = args[1] if isinstance(args[1], int) else 0
    for f in tr.of(src):
        if dim % src.ndim in varying(_pad(f, src.ndim)):
            raise StructureError(f"cannot trace {name} along a dim that carries units (in {tr.where()!r})")
    parts = [(tr.of(x), False), ([f.narrow(dim, 0, 1) if f.shape[dim] > 1 else f for f in tr.of(src)], False)]
    tr.set(out, merge(tr, parts, out.ndim))


@rule("cat", "concat", "concatenate")
def cat(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    xs = list(_arg(args, kwargs, 0, "tensors"))
    dim = _arg(args, kwargs, 1, "dim", 0) % out.ndim
    fs = [tr.of(x) for x in xs]
    if not any(fs):
        return
    along = [[f for f in fx if dim in varying(_pad(f, x.ndim))] for fx, x in zip(fs, xs)]
    count = max(len(a) for a in along)
    if any(0 < len(a) < count for a in along):
        raise StructureError(f"cat of tensors with different unit axes (in {tr.where()!r})")
    facets: list[Tensor] = []
    for i in range(count):
        pieces = [
            full(a[i], x.shape) if a else torch.full(tuple(x.shape), -1, dtype=torch.int64)
            for a, x in zip(along, xs)
        ]
        facets.append(torch.cat(pieces, dim))
    rest = [([f for f in fx if not any(f is g for g in a)], False) for fx, a in zip(fs, along)]
    facets += merge(tr, rest, out.ndim)
    tr.set(out, facets)


@rule("stack")
def stack(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    xs = list(_arg(args, kwargs, 0, "tensors"))
    dim = _arg(args, kwargs, 1, "dim", 0) % out.ndim
    parts = [([_pad(f, x.ndim).unsqueeze(dim) for f in tr.of(x)], False) for x in xs]
    if any(fs for fs, _ in parts):
        tr.set(out, merge(tr, parts, out.ndim))


# --- channel-preserving spatial ops ---------------------------------------------------------
SPATIAL = (
    "max_pool1d max_pool2d max_pool3d avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d "
    "adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d "
    "interpolate upsample max_pool2d_with_indices pixel_shuffle"
).split()


@rule(*SPATIAL)
def spatial(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    x = args[0]
    facets = tr.of(x)
    for f in facets:
        if any(d >= 2 for d in varying(_pad(f, x.ndim))) or name == "pixel_shuffle":
            raise StructureError(f"{name} mixes positions that carry units (in {tr.where()!r})")
    for o in ([out] if isinstance(out, Tensor) else out):
        tr.set(o, list(facets))


# --- reductions and normalisations along a dim ---------------------------------------------
REDUCE = "sum mean amax amin max min prod std var norm logsumexp all any nansum var_mean std_mean".split()
STAT = {"mean", "std", "var", "norm", "logsumexp", "var_mean", "std_mean"}


@rule(*REDUCE)
def reduce(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    x = args[0]
    facets = tr.of(x)
    if not facets:
        return
    dims = _arg(args, kwargs, 2 if name == "norm" else 1, "dim")
    if isinstance(dims, Tensor) or (name in ("max", "min") and len(args) > 1 and isinstance(args[1], Tensor)):
        return elementwise(tr, name, args, kwargs, out)
    dims = tuple(range(x.ndim)) if dims is None else ((dims,) if isinstance(dims, int) else tuple(dims))
    dims = tuple(d % x.ndim for d in dims)
    keep = bool(_arg(args, kwargs, 3 if name == "norm" else 2, "keepdim", False))
    outs = [out] if isinstance(out, Tensor) else [o for o in out if isinstance(o, Tensor)]
    result = []
    for f in facets:
        f = _pad(f, x.ndim)
        vf = set(varying(f))
        if vf & set(dims):
            if name in STAT:
                _stat(tr, f, dims)
            if name in ("max", "min", "amax", "amin") and len(outs) > 1:
                tr.trace.mark("frozen", f)  # an argmax over units depends on which exist
            if not vf - set(dims):
                continue
            _couple_slices(tr, f, _first_along(f, dims))
            f = _first_along(f, dims)
        result.append(f if keep else _drop(f, dims))
    for o in outs:
        tr.set(o, [r for r in result if r.ndim == o.ndim])


def _stat(tr: Any, f: Tensor, dims: tuple[int, ...]) -> None:
    """Record the slices a normalisation statistic averages over: removing some units of a
    slice (but not all) changes the statistic, so such removal is inexact."""
    rest = [d for d in range(f.ndim) if d not in dims]
    rows = f.permute(rest + list(dims)).reshape(-1, int(torch.tensor([f.shape[d] for d in dims]).prod()))
    tr.trace.roles["inexact"].append(torch.unique(rows, dim=0))


def _first_along(f: Tensor, dims: tuple[int, ...]) -> Tensor:
    for d in dims:
        f = f.narrow(d, 0, 1)
    return f


def _drop(f: Tensor, dims: tuple[int, ...]) -> Tensor:
    f = _first_along(f, dims)
    for d in sorted(dims, reverse=True):
        f = f.squeeze(d)
    return f


@rule("softmax", "log_softmax", "cumsum", "cumprod", "argmax", "argmin", "topk", "sort", "argsort")
def along_dim(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    x = args[0]
    facets = tr.of(x)
    if not facets:
        return
    dim = _arg(args, kwargs, 1, "dim", -1)
    if name == "topk":
        dim = _arg(args, kwargs, 2, "dim", -1)
    dim = (dim if isinstance(dim, int) else -1) % x.ndim
    kept = []
    for f in facets:
        if dim in varying(_pad(f, x.ndim)):
            tr.trace.mark("frozen", f)  # each output depends on which units exist
        else:
            kept.append(f)
    for o in ([out] if isinstance(out, Tensor) else out):
        if isinstance(o, Tensor) and o.shape == x.shape:
            tr.set(o, kept)


# --- layers with weights ------------------------------------------------------------------------
def _param_axis(tr: Any, w: Tensor, dim: int, buffer: bool = False) -> Tensor | None:
    """The ids along ``dim`` of a weight (a parameter, or a tensor sliced from one)."""
    for f in tr.of(w, buffer):
        f = _pad(f, w.ndim)
        if varying(f) == (dim,):
            return f.reshape(-1)
    return None


@rule("linear")
def linear(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    x, w = args[0], args[1]
    b = _arg(args, kwargs, 2, "bias")
    w_out, w_in = _param_axis(tr, w, 0), _param_axis(tr, w, 1)
    tr.trace.macs += out.numel() * w.shape[1]
    _contract(tr, x, w_in, -1)
    facets = [f for f in tr.of(x) if x.ndim - 1 not in varying(_pad(f, x.ndim))]
    if w_out is not None:
        tr.trace.mark("producers", w_out)
        o = w_out.view(*([1] * (out.ndim - 1)), -1)
        if b is not None and (b_ids := _param_axis(tr, b, 0)) is not None:
            tr.trace.uf.couple(w_out, b_ids)
        facets.append(o)
    tr.set(out, facets)


def _contract(tr: Any, x: Tensor, ids: Tensor | None, dim: int) -> None:
    """Couple the units of ``x`` along ``dim`` with the weight's input ids ``(in,)``."""
    dim = dim % x.ndim
    for f in tr.of(x):
        f = _pad(f, x.ndim)
        if dim in varying(f) and ids is not None:
            shape = [1] * x.ndim
            shape[dim] = -1
            tr.trace.uf.couple(f, ids.view(shape))
        elif dim in varying(f):
            tr.trace.mark("frozen", f)


@rule("conv1d", "conv2d", "conv3d")
def conv(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    x, w = args[0], args[1]
    b = _arg(args, kwargs, 2, "bias")
    groups = int(_arg(args, kwargs, 6, "groups", 1))
    w_out, w_in = _param_axis(tr, w, 0), _param_axis(tr, w, 1)
    tr.trace.macs += out.numel() * w[0].numel()
    if groups == 1:
        _contract(tr, x, w_in, 1)
    elif w_out is not None:
        # A unit is one whole conv group: its input channels and its output channels.
        opg, ipg = w.shape[0] // groups, w.shape[1]
        heads = w_out.view(groups, opg)
        tr.trace.uf.couple(heads, heads[:, :1])
        _contract(tr, x, heads[:, 0].repeat_interleave(ipg), 1)
        if w_in is not None:
            tr.trace.mark("frozen", w_in)  # shared by every group
    facets = [f for f in tr.of(x) if 1 not in varying(_pad(f, x.ndim))]
    if w_out is not None:
        tr.trace.mark("producers", w_out)
        if b is not None and (b_ids := _param_axis(tr, b, 0)) is not None:
            tr.trace.uf.couple(w_out, b_ids)
        facets.append(w_out.view(1, -1, *([1] * (out.ndim - 2))))
    tr.set(out, facets)


@rule("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def conv_transpose(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    x, w = args[0], args[1]
    b = _arg(args, kwargs, 2, "bias")
    if int(_arg(args, kwargs, 6, "groups", 1)) != 1:
        raise StructureError(f"grouped {name} is not supported (in {tr.where()!r}); exclude it with ignore=[...]")
    w_in, w_out = _param_axis(tr, w, 0), _param_axis(tr, w, 1)
    tr.trace.macs += x.numel() * w[0].numel()
    _contract(tr, x, w_in, 1)
    facets = [f for f in tr.of(x) if 1 not in varying(_pad(f, x.ndim))]
    if w_out is not None:
        tr.trace.mark("producers", w_out)
        if b is not None and (b_ids := _param_axis(tr, b, 0)) is not None:
            tr.trace.uf.couple(w_out, b_ids)
        facets.append(w_out.view(1, -1, *([1] * (out.ndim - 2))))
    tr.set(out, facets)


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
    x = args[0]
    keys = ("running_mean", "running_var", "weight", "bias")
    params = [_arg(args, kwargs, i + 1, k) for i, k in enumerate(keys)]
    _channel_params(tr, x, params, 1, out)


@rule("group_norm")
def group_norm(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    x = args[0]
    for f in tr.of(x):
        if 1 in varying(_pad(f, x.ndim)):
            tr.trace.mark("frozen", f)  # channel groups must stay whole and equal
    _channel_params(tr, x, [_arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")], 1, out)


@rule("layer_norm", "rms_norm")
def layer_norm(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    x = args[0]
    shape = _arg(args, kwargs, 1, "normalized_shape")
    if len(shape) != 1:
        raise StructureError(f"{name} over {len(shape)} dims is not supported (in {tr.where()!r})")
    for f in tr.of(x):
        if x.ndim - 1 in varying(_pad(f, x.ndim)):
            _stat(tr, _pad(f, x.ndim), (x.ndim - 1,))
    keys = ("weight", "bias") if name == "layer_norm" else ("weight",)
    _channel_params(tr, x, [_arg(args, kwargs, i + 2, k) for i, k in enumerate(keys)], x.ndim - 1, out)


@rule("embedding")
def embedding(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    w = _arg(args, kwargs, 1, "weight")
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
    fa = [_pad(f, a.ndim) for f in tr.of(a)]
    fb = [_pad(f, b.ndim) for f in tr.of(b)]
    batch = set(range(nd - 2))
    # contraction: a's last dim against b's second-to-last
    for f in fa:
        if a.ndim - 1 in varying(f) and not (set(varying(f)) - {a.ndim - 1}):
            for g in fb:
                if b.ndim - 2 in varying(g) and not (set(varying(g)) - {b.ndim - 2}):
                    tr.trace.uf.couple(f.reshape(-1), g.reshape(-1))
    facets: list[Tensor] = []
    tagged = [(f, False) for f in fa] + [(g, True) for g in fb]
    heads = [(_pad(f, nd), is_b) for f, is_b in tagged if set(varying(_pad(f, nd))) & batch]
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
        facets.append(next(iter(reps.values())).unsqueeze(-1))
    if not heads:
        for f in fa:
            if varying(f) == (a.ndim - 2,):
                facets.append(_pad(f[..., :, :1], nd))
        for g in fb:
            if varying(g) == (b.ndim - 1,):
                if _is_param(tr, b):
                    tr.trace.mark("producers", g)
                facets.append(_pad(g[..., :1, :], nd))
        for f in fa:
            if a.ndim - 1 in varying(f) and set(varying(f)) - {a.ndim - 1}:
                raise StructureError(f"{name} mixes unit axes (in {tr.where()!r})")
    tr.set(out, facets)


@rule("addmm", "baddbmm", "addbmm")
def addmm(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    bias, m1, m2 = args[0], args[1], args[2]
    tmp = torch.empty(out.shape)
    matmul(tr, "matmul", (m1, m2), {}, tmp)
    parts = [(tr.of(tmp), False), (tr.of(bias), _is_param(tr, bias))]
    if _is_param(tr, m2) and (ids := _param_axis(tr, m2, 1)) is not None and (bi := _param_axis(tr, bias, 0)) is not None:
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

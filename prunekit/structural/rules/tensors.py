"""Rules for ops that move or combine activations: shape-preserving, elementwise, indexing,
padding, concatenation, spatial ops, reductions and ops along one dim."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import StructureError
from ..facets import full, varying
from .base import arg, couple_slices, is_param, merge, pad_to, rule, stat

# --- shape-preserving ------------------------------------------------------------------
IDENTITY = (
    "float double half bfloat16 to type type_as contiguous clone detach cpu cuda "
    "requires_grad_ relu relu_ relu6 gelu silu sigmoid tanh neg __neg__ abs exp log sqrt "
    "rsqrt erf square reciprocal sign dropout dropout1d dropout2d alpha_dropout hardtanh "
    "hardswish hardsigmoid leaky_relu elu selu celu softplus mish sin cos exp2 log1p "
    "isnan isinf isfinite logical_not __invert__ bool long int round floor ceil gelu_ "
    "silu_ sigmoid_ tanh_ nan_to_num pow_ sqrt_ exp_ __abs__ expm1 expm1_ logsigmoid softsign "
    "tanhshrink softshrink hardshrink relu_ elu_ leaky_relu_ threshold erfinv trunc frac sgn positive "
    "conj resolve_conj resolve_neg sinh cosh asinh atan log2 log10 rrelu"
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
    "masked_fill_ clamp_ copysign hypot atan2 xlogy rsub multiply divide subtract "
    "clamp_min clamp_max clamp_min_ clamp_max_ float_power fmax fmin logaddexp heaviside "
    "__rdiv__ __rfloordiv__ __rmod__ __rand__ __ror__ __xor__ __rxor__ __ifloordiv__ __ipow__ __imod__ "
    "__iand__ __ior__ bitwise_and bitwise_or bitwise_xor logical_xor"
).split()


@rule(*ELEMENTWISE)
def elementwise(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    if not isinstance(out, Tensor):
        return
    ops = [a for a in list(args) + list(kwargs.values()) if isinstance(a, Tensor)]
    parts = [(tr.of(a), is_param(tr, a)) for a in ops]
    if any(fs for fs, _ in parts):
        tr.set(out, merge(tr, parts, out.ndim))


#: ops whose output has the input's shape but none of its values: constants, no units
CONSTANT = ("new_empty new_zeros new_ones new_full new_tensor zeros_like ones_like empty_like full_like "
            "rand_like randn_like randint_like").split()


@rule(*CONSTANT)
def constant(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    """The output depends on no value of the input: it carries no units."""


@rule("view_as_complex")
def view_as_complex(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    """``(..., D, 2)`` real -> ``(..., D)`` complex (complex rotary embeddings): the pair axis
    must carry no units; the others move as they are."""
    x = args[0]
    kept = []
    for f in tr.of(x):
        f = pad_to(f, x.ndim)
        if x.ndim - 1 in varying(f):
            tr.trace.mark("frozen", f)
        else:
            kept.append(f[..., 0])
    tr.set(out, kept)


@rule("view_as_real")
def view_as_real(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    """``(..., D)`` complex -> ``(..., D, 2)`` real."""
    tr.set(out, [pad_to(f, args[0].ndim).unsqueeze(-1) for f in tr.of(args[0])])


@rule("normalize")
def normalize(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    """``F.normalize(x, p, dim)``: a norm over ``dim`` divides every entry, so removing units
    along ``dim`` changes the rest (inexact); facets pass through."""
    x = args[0]
    dim = int(arg(args, kwargs, 2, "dim", 1)) % x.ndim
    for f in tr.of(x):
        f = pad_to(f, x.ndim)
        if dim in varying(f):
            stat(tr, f, (dim,))
    tr.set(out, list(tr.of(x)))


@rule("lstm", "gru", "rnn_tanh", "rnn_relu")
def recurrent(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    """A fused recurrent kernel: a black box. Units entering it (inputs, weights) are frozen;
    its outputs carry none."""
    for t in _flat(list(args) + list(kwargs.values())):
        for f in tr.of(t):
            tr.trace.mark("frozen", f)


def _flat(items: list[Any]) -> list[Tensor]:
    out: list[Tensor] = []
    for a in items:
        if isinstance(a, Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out += _flat(list(a))
    return out


@rule("copy_")
def copy(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    tr.set(out, list(tr.of(args[1])))


# --- shape-moving: run the same op on the ids --------------------------------------------
INDEX = (
    "view reshape permute transpose t T mT flatten unflatten squeeze unsqueeze expand "
    "expand_as repeat repeat_interleave narrow select __getitem__ split chunk unbind "
    "tensor_split flip roll movedim moveaxis swapaxes swapdims view_as reshape_as "
    "index_select gather take_along_dim diagonal tril triu unfold masked_select broadcast_to "
    "atleast_1d atleast_2d atleast_3d"
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


def _cpu(obj: Any) -> Any:
    """Index tensors move to the CPU, where ids live (the model may run on a GPU)."""
    if isinstance(obj, Tensor):
        return obj.cpu()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(o) for o in obj)
    return obj


def func_on_ids(name: str, ids: Tensor, args: tuple, kwargs: dict) -> Any:
    args, kwargs = _cpu(args), {k: _cpu(v) for k, v in kwargs.items()}
    if name in ("T", "mT"):
        return getattr(ids, name)
    if name == "gather":  # torch.gather(x, dim, index)
        return torch.gather(ids, args[1], args[2])
    return getattr(torch.Tensor, name)(ids, *args[1:], **kwargs)


@rule("pad")
def pad(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    x = args[0]
    widths = arg(args, kwargs, 1, "pad")
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
      "index_put_", "index_put", "scatter", "scatter_", "scatter_reduce", "scatter_reduce_")
def scatter(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    x = args[0]
    src = next((a for a in reversed(args[1:]) if isinstance(a, Tensor) and tr.of(a)), None)
    if src is None:
        if tr.of(x):
            tr.set(out, list(tr.of(x)))
        return
    dim = args[1] if isinstance(args[1], int) else 0
    for f in tr.of(src):
        if dim % src.ndim in varying(pad_to(f, src.ndim)):
            raise StructureError(f"cannot trace {name} along a dim that carries units (in {tr.where()!r})")
    parts = [(tr.of(x), False), ([f.narrow(dim, 0, 1) if f.shape[dim] > 1 else f for f in tr.of(src)], False)]
    tr.set(out, merge(tr, parts, out.ndim))


@rule("cat", "concat", "concatenate")
def cat(tr: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    xs = list(arg(args, kwargs, 0, "tensors"))
    dim = arg(args, kwargs, 1, "dim", 0) % out.ndim
    fs = [tr.of(x) for x in xs]
    if not any(fs):
        return
    along = [[f for f in fx if dim in varying(pad_to(f, x.ndim))] for fx, x in zip(fs, xs)]
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
    xs = list(arg(args, kwargs, 0, "tensors"))
    dim = arg(args, kwargs, 1, "dim", 0) % out.ndim
    parts = [([pad_to(f, x.ndim).unsqueeze(dim) for f in tr.of(x)], False) for x in xs]
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
        if any(d >= 2 for d in varying(pad_to(f, x.ndim))) or name == "pixel_shuffle":
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
    dims = arg(args, kwargs, 2 if name == "norm" else 1, "dim")
    if isinstance(dims, Tensor) or (name in ("max", "min") and len(args) > 1 and isinstance(args[1], Tensor)):
        return elementwise(tr, name, args, kwargs, out)
    dims = tuple(range(x.ndim)) if dims is None else ((dims,) if isinstance(dims, int) else tuple(dims))
    dims = tuple(d % x.ndim for d in dims)
    keep = bool(arg(args, kwargs, 3 if name == "norm" else 2, "keepdim", False))
    outs = [out] if isinstance(out, Tensor) else [o for o in out if isinstance(o, Tensor)]
    result = []
    for f in facets:
        f = pad_to(f, x.ndim)
        vf = set(varying(f))
        if vf & set(dims):
            if name in STAT:
                stat(tr, f, dims)
            if name in ("max", "min", "amax", "amin") and len(outs) > 1:
                tr.trace.mark("frozen", f)  # an argmax over units depends on which exist
            if not vf - set(dims):
                continue
            couple_slices(tr, f, _first_along(f, dims))
            f = _first_along(f, dims)
        result.append(f if keep else _drop(f, dims))
    for o in outs:
        tr.set(o, [r for r in result if r.ndim == o.ndim])


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
    dim = arg(args, kwargs, 1, "dim", -1)
    if name == "topk":
        dim = arg(args, kwargs, 2, "dim", -1)
    dim = (dim if isinstance(dim, int) else -1) % x.ndim
    kept = []
    for f in facets:
        if dim in varying(pad_to(f, x.ndim)):
            tr.trace.mark("frozen", f)  # each output depends on which units exist
        else:
            kept.append(f)
    for o in ([out] if isinstance(out, Tensor) else out):
        if isinstance(o, Tensor) and o.shape == x.shape:
            tr.set(o, kept)


# The rules for layers with weights (linear, conv, norms, embeddings, attention) register
# themselves into RULES on import.

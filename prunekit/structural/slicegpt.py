"""SliceGPT: exact width pruning by rotating the residual stream onto its principal components
and deleting the least significant ones (Ashkboos et al. 2024, "SliceGPT: Compress Large Language
Models by Deleting Rows and Columns").

For a pre-norm decoder (Llama, Qwen2/3, Mistral, SmolLM2):

1. Every RMSNorm's weight is folded into the linears that read it (q/k/v, gate/up, lm_head), which
   leaves ``x / rms(x)``: it commutes with any orthogonal ``Q`` (``rms(xQ) = rms(x)``).
2. Block by block, on calibration data run through the already rotated and sliced model, the
   PCA of the residual stream (eigenvectors of the float64 ``X^T X``, largest eigenvalue first)
   gives one basis at the input of each norm: the attention side and the MLP side of every block,
   and the output of the last block. Writers into the residual (embedding, o_proj, down_proj)
   are rotated by the basis they write into, readers (q/k/v, gate/up, lm_head) by the one they
   read. Where two bases meet on a residual connection, the shortcut carries
   ``Q_prev^T Q_next`` (paper, eq. 9).
3. Only the first ``d = round((1 - ratio) * D)`` principal directions are kept.

Tied embeddings stay tied (a departure from the paper, whose code unties them): the embedding and
the head share ``E Q_0``, and the final norm is followed by one ``(d, d)`` matrix
``Q_L^T diag(gamma) Q_0`` carrying its scale and the change from the last block's basis to the
embedding's. Untying would add a whole ``(V, d)`` head, 28 M of SmolLM2-135M's 135 M parameters;
the matrix adds ``d^2``. Exact at ratio 0 as well; when slicing, the head reads only the part of
what it reads that lies in the span of ``Q_0``, so for a tied head ``Q_0`` is the PCA of both
sides of the shared matrix: the embeddings' covariance and that of the dense model's final-norm
outputs, each divided by its trace (one extra dense forward of the calibration data). On
SmolLM2-135M at ratio 0.25 that is perplexity 35.9 at 112.3 M parameters, against 62.4 with the
embeddings' PCA alone and 58.7 untied at 113.1 M (ratio 0.356).

At ratio 0 every ``Q`` is orthogonal and the model computes the same function (up to rounding).

Design: the shortcut matrices live on the decoder layer itself. Its class is swapped for a
subclass (``Sliced<LayerClass>``) that adds two ``(d, d)`` parameters, ``attn_shortcut`` and
``mlp_shortcut``, and a forward that multiplies the residual by them (for a tied head, the final
norm becomes ``Sliced<NormClass>`` with ``head_shortcut``); every parameter keeps its
Hugging Face name, so the rest of prunekit (block finder, runners, adapters) still sees a normal
model. The cost: plain ``from_pretrained`` cannot load the result (the two extra tensors per layer
have no place in the stock class). ``prunekit_structure.json`` names the sliced modules
(``slicegpt_blocks``) and :func:`prunekit.models.rebuild.load_structured` calls
:func:`add_shortcuts` before loading the weights, so ``prunekit.load(DIR)`` reloads it exactly.

Norms: the paper's sliced RMSNorm divides by ``sqrt(sum(x^2) / D)`` with the original width ``D``;
a stock RMSNorm over ``d`` entries with weight ``sqrt(D / d)`` computes the same (up to ``eps``),
so the norms stay stock modules with that constant weight.
"""
from __future__ import annotations

import functools
import inspect
import logging
import math
import time
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..calibration import CalibrationData, RunOptions
from ..errors import ConfigError, UnsupportedModelError
from ..result import Result
from ..rounding import count

log = logging.getLogger(__name__)

#: ``config.model_type`` of the decoders whose blocks are ``x + attn(norm(x))``, ``h + mlp(norm(h))``
#: with RMSNorm and q/k/v/o, gate/up/down projections under these names.
SUPPORTED = ("llama", "qwen2", "qwen3", "mistral")
#: The structural options SliceGPT has no use for, with the value that means "not used".
UNUSED_OPTIONS = {"allocation": "uniform", "overrides": (), "ignore": (), "heads": "auto", "bias_compensation": None}
SHORTCUTS = ("attn_shortcut", "mlp_shortcut")
#: The final norm's ``(d, d)`` matrix in front of a tied head.
HEAD_SHORTCUT = "head_shortcut"


# ---------------------------------------------------------------------------------------------
# pure tensor helpers
# ---------------------------------------------------------------------------------------------

def kept_width(hidden: int, ratio: float, round_to: int = 1) -> int:
    """The number of principal directions kept: ``round((1 - ratio) * hidden)`` (half up), then
    the nearest multiple of ``round_to`` (at least one multiple, at most ``hidden``)."""
    kept = count(1.0 - ratio, hidden)
    if round_to > 1:
        kept = min(hidden, max(round_to, round_to * round(kept / round_to)))
    if kept < 1:
        raise ConfigError(f"ratio {ratio} keeps no dimension of the hidden width {hidden}; "
                          f"use a ratio below {1 - 0.5 / hidden:.4g}")
    return kept


def add_covariance(cov: Tensor, x: Tensor) -> None:
    """``cov += X^T X`` in float64 for hidden states ``x`` ``(..., D)``; ``cov`` is ``(D, D)``."""
    flat = x.reshape(-1, x.shape[-1]).to(cov)  # (tokens, D)
    cov.addmm_(flat.T, flat)


def principal_basis(cov: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues ``(D,)`` and eigenvectors ``(D, D)`` (columns) of the symmetric ``cov``,
    largest eigenvalue first, in float64."""
    values, vectors = torch.linalg.eigh(cov.double())  # ascending
    order = torch.argsort(values, descending=True)
    return values[order], vectors[:, order]


def rotate_reader(weight: Tensor, q: Tensor) -> Tensor:
    """A linear that reads the residual, ``(out, D)``, made to read it in basis ``q`` ``(D, d)``:
    ``W q``, ``(out, d)``, computed in float64 and returned in ``weight``'s dtype."""
    return (weight.double() @ q.to(weight.device)).to(weight.dtype)


def rotate_writer(weight: Tensor, q: Tensor) -> Tensor:
    """A linear (or embedding transposed) that writes the residual, ``(D, in)``, made to write it
    in basis ``q`` ``(D, d)``: ``q^T W``, ``(d, in)``."""
    return (q.to(weight.device).T @ weight.double()).to(weight.dtype)


def shortcut(q_prev: Tensor, q_next: Tensor) -> Tensor:
    """The residual's change of basis, ``Q_prev^T Q_next``: ``(d_prev, d_next)`` from the kept
    columns ``(D, d_prev)`` and ``(D, d_next)``."""
    return q_prev.T @ q_next


def fold_norm(reader: Tensor, norm_weight: Tensor) -> Tensor:
    """``W diag(gamma)``: a reader ``(out, D)`` absorbing the norm's scale ``gamma`` ``(D,)``."""
    return (reader.double() * norm_weight.double().to(reader.device)).to(reader.dtype)


# ---------------------------------------------------------------------------------------------
# the sliced decoder layer
# ---------------------------------------------------------------------------------------------

def _sliced_forward(self: nn.Module, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """The stock pre-norm block with the residual carried through the shortcut matrices."""
    kwargs = _as_kwargs(self, args, kwargs)
    residual = hidden_states @ self.attn_shortcut  # (B, T, d_in) @ (d_in, d_mid)
    out = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
    hidden = residual + (out[0] if isinstance(out, tuple) else out)  # (B, T, d_mid)
    residual = hidden @ self.mlp_shortcut  # (B, T, d_mid) @ (d_mid, d_out)
    return residual + self.mlp(self.post_attention_layernorm(hidden))


def _as_kwargs(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The block's arguments after the hidden states as keywords, positional ones named by the stock
    layer's signature (the attention takes them all by keyword)."""
    if not args:
        return dict(kwargs)
    stock = next(c for c in type(layer).__mro__ if not getattr(c, "prunekit_slicegpt", False))
    names = list(inspect.signature(stock.forward).parameters)[2:]  # after self, hidden_states
    return {**dict(zip(names, args)), **kwargs}


def _sliced_norm_forward(self: nn.Module, hidden_states: Tensor) -> Tensor:
    """The stock final norm, then the tied head's change of basis ``Q_L^T diag(gamma) Q_0``."""
    stock = next(c for c in type(self).__mro__ if not getattr(c, "prunekit_slicegpt", False))
    return stock.forward(self, hidden_states) @ self.head_shortcut  # (B, T, d) @ (d, d)


@functools.lru_cache(maxsize=None)
def sliced_class(cls: type, norm: bool = False) -> type:
    """``Sliced<cls>``: the decoder layer class whose residual goes through shortcut matrices, or
    with ``norm`` the final norm class followed by the tied head's matrix."""
    forward = _sliced_norm_forward if norm else _sliced_forward
    return type(f"Sliced{cls.__name__}", (cls,), {"forward": forward, "prunekit_slicegpt": True,
                                                   "__module__": __name__, "__doc__": forward.__doc__})


def _is_layer(module: nn.Module) -> bool:
    return hasattr(module, "input_layernorm")


def add_shortcuts(model: nn.Module, names: list[str]) -> None:
    """Turn the modules ``names`` (decoder layers, or the final norm of a tied head) into sliced
    ones with identity shortcuts (of their current width; a reload then resizes them to the
    recorded shapes and loads them)."""
    for name in names:
        module = model.get_submodule(name)
        layer = _is_layer(module)
        if not getattr(module, "prunekit_slicegpt", False):
            module.__class__ = sliced_class(type(module), norm=not layer)
        w = module.input_layernorm.weight if layer else module.weight
        for attr in SHORTCUTS if layer else (HEAD_SHORTCUT,):
            if attr not in module._parameters:
                module.register_parameter(attr, nn.Parameter(torch.eye(w.shape[0], dtype=w.dtype, device=w.device),
                                                             requires_grad=False))


def sliced_blocks(model: nn.Module) -> list[str]:
    """The names of the modules carrying SliceGPT shortcuts (for the structure record)."""
    return [n for n, m in model.named_modules() if getattr(m, "prunekit_slicegpt", False)]


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------

def check_config(cfg: Any) -> None:
    """A structure config naming ``slicegpt`` prunes the width and sets no option it would ignore."""
    if cfg.structure != "width":
        raise ConfigError(f"method 'slicegpt' applies to --structure width only (it rotates and slices the "
                          f"residual stream), not to --structure {cfg.structure}; use --structure width, or a "
                          f"unit score (flap, wanda, ...) for {cfg.structure}")
    for name, unused in UNUSED_OPTIONS.items():
        if getattr(cfg, name) != unused:
            raise ConfigError(f"slicegpt keeps the same width in every block and has no use for {name}="
                              f"{getattr(cfg, name)!r}; remove it (slicegpt takes ratio, round_to and calibration)")


def _layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList, nn.Module]:
    """``(base model, decoder layers, lm_head)`` of a supported decoder, or a specific error."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    base, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if kind not in SUPPORTED or base is None or not isinstance(head, nn.Linear):
        raise UnsupportedModelError(
            f"slicegpt supports Llama-style pre-RMSNorm decoders with an lm_head ({', '.join(SUPPORTED)}); "
            f"{type(model).__name__} (model_type {kind!r}) is not one: prune its width with --method flap or "
            "wanda instead")
    layers = base.layers
    for i, layer in enumerate(layers):
        if getattr(layer, "prunekit_slicegpt", False):
            raise ConfigError(f"{type(model).__name__} layer {i} is already sliced by slicegpt; slice the "
                              "original model once with the ratio you want")
        for path in ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.down_proj"):
            try:
                layer.get_submodule(path)
            except AttributeError:
                raise UnsupportedModelError(f"slicegpt: {type(layer).__name__} (layer {i} of "
                                            f"{type(model).__name__}) has no {path}") from None
    return base, layers, head


# ---------------------------------------------------------------------------------------------
# the entry function
# ---------------------------------------------------------------------------------------------

def prune_slicegpt(model: nn.Module, config: Any, data: CalibrationData | None, options: RunOptions,
                   tokenizer: Any = None, example: Any = None, plan: bool = False) -> Result:
    """Rotate and slice ``model``'s residual stream in place to ``round((1 - ratio) * hidden)``
    dimensions (SliceGPT); ``data``: the calibration batches the PCA is taken over; ``example``:
    one input to count MACs on (default: cut from ``data``). ``plan`` without ``data``: the PCA of
    ``example`` alone stands in (sizes and MACs are those of the real run)."""
    from ..calibration import as_calibration
    from ..evaluate.macs import count_macs
    from ..recipe import one_stage
    from .undo import Undo

    check_config(config)
    if plan and data is None and example is not None:
        data = as_calibration(example.get("input_ids") if isinstance(example, dict) else example)
    if data is None or not len(data):
        raise ConfigError("slicegpt needs calibration data (--calib TEXT, or data=...)")
    start = time.perf_counter()
    base, layers, head = _layers(model)
    hidden = base.embed_tokens.weight.shape[1]
    kept = kept_width(hidden, config.ratio, config.round_to)
    params_before = sum(p.numel() for p in model.parameters())
    example = example if example is not None else data.trace_inputs(model)
    macs_before = count_macs(model, example)
    undo = Undo(model)
    try:
        with torch.no_grad():
            changes = _rotate_and_slice(model, base, layers, head, data, kept, options)
    except BaseException:
        undo.restore()
        for module in model.modules():  # the class swap is not in the snapshot
            if getattr(module, "prunekit_slicegpt", False):
                module.__class__ = type(module).__mro__[1]
                for attr in (*SHORTCUTS, HEAD_SHORTCUT):
                    module._parameters.pop(attr, None)
        raise
    macs_after = count_macs(model, example)
    seconds = time.perf_counter() - start
    params_after = sum(p.numel() for p in model.parameters())
    report = {
        "structure": "width", "ratio": config.ratio, "method": "slicegpt", "allocation": "uniform",
        "params_before": params_before, "params_after": params_after, "macs_before": macs_before,
        "macs_after": macs_after, "seconds": seconds, "units_before": hidden, "units_removed": hidden - kept,
        "exact": kept == hidden,  # the same function only when nothing is sliced: deleting principal dims is lossy
        "ratio_requested": config.ratio, "ratio_achieved": (hidden - kept) / hidden, "hidden_before": hidden,
        "hidden_after": kept, "groups": [{"name": "residual", "kind": "width", "units_before": hidden,
                                          "removed": hidden - kept}],
        "config_changes": changes,
    }
    log.info("slicegpt: hidden %d -> %d, %d -> %d params in %.1f s", hidden, kept, params_before, params_after,
             seconds)
    history = [{"kind": "structure", "config": config.to_dict()["structural"], "seconds": seconds}]
    return Result(model, one_stage(config), report, history, tokenizer)


def _rotate_and_slice(model: nn.Module, base: nn.Module, layers: nn.ModuleList, head: nn.Linear,
                      data: CalibrationData, kept: int, options: RunOptions) -> dict[str, Any]:
    from ..calibration.capture import capture_block_inputs

    embed = base.embed_tokens
    hidden = embed.weight.shape[1]
    tied = head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr()
    gamma = base.norm.weight.detach().clone()  # (D,): the final norm's scale, folded into the head
    head_cov = _output_covariance(model, base.norm, data) if tied else None  # (D, D), the dense model's
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            lin.weight.data = fold_norm(lin.weight, layer.input_layernorm.weight)
        for lin in (mlp.gate_proj, mlp.up_proj):
            lin.weight.data = fold_norm(lin.weight, layer.post_attention_layernorm.weight)
    if not tied:
        head.weight.data = fold_norm(head.weight, gamma)
    for norm in (*(n for la in layers for n in (la.input_layernorm, la.post_attention_layernorm)), base.norm):
        norm.weight.data = torch.ones_like(norm.weight)  # unit RMSNorm commutes with rotations

    inputs, calls = capture_block_inputs(model, layers, data)  # (B, T, D) embeddings per batch
    q = q_embed = _basis(inputs, kept, head_cov)  # (D, d): the embeddings' (and a tied head's) principal directions
    embed.weight.data = rotate_reader(embed.weight, q)  # (V, D) @ (D, d): the embedding writes rows (a tied head too)
    xs = [(x.double() @ q.to(x.device)).to(x.dtype) for x in inputs]  # (B, T, d) per batch
    scale = math.sqrt(hidden / kept)  # RMSNorm over d entries with this weight = mean over the original D
    bar = tqdm(list(enumerate(layers)), desc="slicegpt", disable=not options.progress, leave=False)
    for i, layer in bar:
        q, xs = _slice_block(layer, q, xs, calls[i], scale)
    _set_norm(base.norm, kept, scale)
    if tied:  # the head is the rotated embedding: n(x) Q_L^T diag(gamma) Q_0 (E Q_0)^T
        base.norm.__class__ = sliced_class(type(base.norm), norm=True)
        w = base.norm.weight
        matrix = (q.T * gamma.double().to(q.device)) @ q_embed  # (d, D) * (D,) @ (D, d)
        base.norm.register_parameter(HEAD_SHORTCUT, nn.Parameter(matrix.to(w), requires_grad=False))
    else:
        head.weight.data = rotate_reader(head.weight, q)  # (V, D) @ (D, d)
    config = model.config
    head_dim = layers[0].self_attn.head_dim
    config.head_dim = head_dim  # explicit: it no longer follows from hidden_size / heads
    config.hidden_size = kept
    return {"": {"hidden_size": kept, "head_dim": head_dim}}


def _set_norm(norm: nn.Module, kept: int, scale: float) -> None:
    norm.weight.data = torch.full((kept,), scale, dtype=norm.weight.dtype, device=norm.weight.device)


def _basis(states: list[Tensor], kept: int, other: Tensor | None = None) -> Tensor:
    """The first ``kept`` principal directions ``(D, kept)`` (float64) of hidden states ``(B, T, D)``;
    with ``other`` ``(D, D)``, of both covariances, each divided by its trace."""
    width = states[0].shape[-1]
    cov = torch.zeros(width, width, dtype=torch.float64, device=states[0].device)
    for x in states:
        add_covariance(cov, x)
    if other is not None:
        cov = cov / cov.trace() + other.to(cov.device) / other.trace()
    return principal_basis(cov)[1][:, :kept]


class _Stop(Exception):
    pass


def _output_covariance(model: nn.Module, norm: nn.Module, data: CalibrationData) -> Tensor:
    """``sum v^T v`` ``(D, D)`` (float64) over the outputs ``v`` of ``norm`` (what the head reads)
    on every calibration batch; the forward stops there, before the head."""
    cov: Tensor | None = None

    def hook(module: nn.Module, args: Any, out: Tensor) -> None:
        nonlocal cov
        if cov is None:
            cov = torch.zeros(out.shape[-1], out.shape[-1], dtype=torch.float64, device=out.device)
        add_covariance(cov, out)
        raise _Stop

    handle = norm.register_forward_hook(hook)
    try:
        for batch in data:
            try:
                data.forward(model, batch)
            except _Stop:
                pass
    finally:
        handle.remove()
    if cov is None:
        raise UnsupportedModelError(f"slicegpt: {type(model).__name__} never ran its final norm on the calibration "
                                    "data, so the tied head's basis cannot be computed")
    return cov


def _slice_block(layer: nn.Module, q_in: Tensor, xs: list[Tensor], calls: list[Any],
                 scale: float) -> tuple[Tensor, list[Tensor]]:
    """Rotate and slice one decoder layer whose inputs ``xs`` ``(B, T, d)`` are in the kept basis
    ``q_in`` ``(D, d)`` (of the full basis ``(D, D)``); return the basis of its output and its
    outputs in that basis. ``calls``: per batch, the other arguments the model called it with."""
    attn, mlp = layer.self_attn, layer.mlp
    kept = xs[0].shape[-1]
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
        lin.weight.data = rotate_reader(lin.weight, q_in)  # (out, d)
    _set_norm(layer.input_layernorm, kept, scale)
    mids = []  # the residual after attention, in the original basis (B, T, D)
    for x, call in zip(xs, calls):
        kwargs = _as_kwargs(layer, call.args, call.kwargs)
        out = attn(hidden_states=layer.input_layernorm(x), **kwargs)
        mids.append(_back(x, q_in) + (out[0] if isinstance(out, tuple) else out))
    q_mid = _basis(mids, kept)  # (D, d)
    _write(attn.o_proj, q_mid)
    for lin in (mlp.gate_proj, mlp.up_proj):
        lin.weight.data = rotate_reader(lin.weight, q_mid)
    _set_norm(layer.post_attention_layernorm, kept, scale)
    ms = [_forth(m, q_mid) for m in mids]  # (B, T, d)
    del mids
    outs = [_back(m, q_mid) + mlp(layer.post_attention_layernorm(m)) for m in ms]  # (B, T, D)
    q_out = _basis(outs, kept)
    _write(mlp.down_proj, q_out)
    add_shortcuts_to(layer, shortcut(q_in, q_mid), shortcut(q_mid, q_out))
    return q_out, [_forth(o, q_out) for o in outs]


def _back(x: Tensor, q: Tensor) -> Tensor:
    """Hidden states ``(B, T, d)`` in basis ``q`` ``(D, d)`` back in the original one ``(B, T, D)``."""
    return (x.double() @ q.to(x.device).T).to(x.dtype)


def _forth(x: Tensor, q: Tensor) -> Tensor:
    """Hidden states ``(B, T, D)`` projected onto the kept basis ``q`` ``(D, d)``: ``(B, T, d)``."""
    return (x.double() @ q.to(x.device)).to(x.dtype)


def _write(lin: nn.Linear, q: Tensor) -> None:
    """A residual writer ``(D, in)`` now writes the basis ``q`` ``(D, d)``: ``(d, in)``."""
    lin.weight.data = rotate_writer(lin.weight, q)
    if lin.bias is not None:
        lin.bias.data = rotate_writer(lin.bias[:, None], q)[:, 0]


def add_shortcuts_to(layer: nn.Module, attn: Tensor, mlp: Tensor) -> None:
    """Make ``layer`` a sliced layer with shortcut matrices ``attn`` ``(d_in, d_mid)`` and ``mlp``
    ``(d_mid, d_out)`` (in the dtype of its weights)."""
    w = layer.input_layernorm.weight
    layer.__class__ = sliced_class(type(layer))
    for name, value in zip(SHORTCUTS, (attn, mlp)):
        layer.register_parameter(name, nn.Parameter(value.to(w.dtype).to(w.device), requires_grad=False))


__all__ = ["prune_slicegpt", "kept_width", "add_covariance", "principal_basis", "rotate_reader", "rotate_writer",
           "shortcut", "fold_norm", "add_shortcuts", "sliced_blocks", "sliced_class", "check_config", "SUPPORTED"]

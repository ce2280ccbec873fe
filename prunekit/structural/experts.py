"""Expert pruning for mixture-of-experts layers: remove whole experts and resize the router.

A MoE layer is any module with a ``gate`` (router; weight ``(experts, hidden)``) and
``experts`` (either 3-D parameters ``(experts, ...)`` as in transformers 5, or an
``nn.ModuleList``). Removing expert ``e`` equals masking its router logit to ``-inf``.
Routing-frequency scoring follows Lu et al., "Not All Experts are Equal: Efficient Expert
Pruning and Skipping for Mixture-of-Experts LLMs" (ACL 2024), in its simplest form: the
routing weight mass each expert receives on calibration data.

Every data-driven score watches the dense model through one helper, :func:`_observe` (hooks
on the router or the MoE layer during the sequential runner's pass): ``frequency`` sums gate
weights, ``reap`` and ``easy_ep`` gate-weighted expert-output norms (the experts' outputs
recomputed by the layer's own experts module, each routed token alone at weight 1), and
``greedy`` caches each layer's inputs and outputs and searches removals on them when its
block is done (the removal applied for real and undone, so it routes exactly as the pruned
model will).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..calibration import CalibrationData, Observer, RunOptions, run_sequential
from ..errors import ConfigError, StructureError
from ..models.adapters import GENERIC
from ..models.decoder import block_list
from ..models.moe import router_of, router_weight
from ..registry import Registry
from ..scoring.random import uniform_scores

#: the generic adapter's expert-count fields (attributes of MoE modules use the same names)
EXPERT_ATTRS = GENERIC.sizes["experts"]


@dataclass(frozen=True)
class MoELayer:
    name: str
    module: nn.Module
    router_name: str = "gate"

    @property
    def router(self) -> nn.Module:
        return getattr(self.module, self.router_name)

    @property
    def router_weight(self) -> Tensor:
        return router_weight(self.router)  # (experts, hidden)

    @property
    def count(self) -> int:
        return self.router_weight.shape[0]


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every module with ``experts`` and a router (``gate`` or ``router``)."""
    return [MoELayer(name, m, found[0]) for name, m in model.named_modules() if (found := router_of(m)) is not None]


#: score(model, MoE layers, calibration data or None, generator, runner options) -> per layer (experts,)
ExpertScore = Callable[[nn.Module, list[MoELayer], "CalibrationData | None", torch.Generator, RunOptions],
                       list[Tensor]]
EXPERT_SCORES: Registry[ExpertScore] = Registry("expert score", "expert_scores")


#: see(layer index, hook args, hook output): one forward of the module watched in that layer
Seen = Callable[[int, tuple, Any], None]


class _AfterPass:
    """A handle whose ``remove()`` (the runner calls it once the block has computed every
    batch, while the block is still on the compute device) finishes one layer."""

    def __init__(self, finish: Callable[[], None]) -> None:
        self.finish = finish

    def remove(self) -> None:
        self.finish()


def _observe(model: nn.Module, layers: list[MoELayer], data: CalibrationData | None, options: RunOptions,
             method: str, watched: Callable[[MoELayer], nn.Module], see: Seen,
             done: Callable[[int], None] | None = None) -> None:
    """Run the calibration data through the dense model block by block (the thread-free
    sequential runner) and call ``see(i, args, out)`` on every forward of ``watched(layers[i])``;
    ``done(i)`` once layer i's block has seen all batches. The one hooking path of every
    data-driven expert score."""
    if not data:
        raise ConfigError(f"expert score {method!r} needs calibration data (--calib TEXT or data=...)")
    index = {id(watched(layer)): i for i, layer in enumerate(layers)}

    def record(module: nn.Module, args: tuple, out: Any) -> None:
        see(index[id(module)], args, out)

    def hooks(b: int, block: nn.Module) -> list[Any]:
        mine = [m for m in block.modules() if id(m) in index]
        handles: list[Any] = [m.register_forward_hook(record) for m in mine]  # removed first
        if done is not None:
            handles += [_AfterPass(lambda i=index[id(m)]: done(i)) for m in mine]
        return handles

    with torch.no_grad():
        run_sequential(model, data, block_list(model), [{} for _ in range(_block_count(model))], lambda n, s: None,
                       modifies=False, options=options, observer=Observer(hooks=hooks))


def _routing(layer: MoELayer, args: tuple, out: Any) -> tuple[Tensor, Tensor, Tensor]:
    """``(tokens (T, hidden), weights (T, k), indices (T, k))`` from one router forward: the
    weights are the ones the layer applies to its experts' outputs."""
    if not (isinstance(out, tuple) and len(out) == 3):
        raise StructureError(f"router of {layer.name} does not return (logits, weights, indices); "
                             "prunekit cannot observe its routing")
    x = args[0]
    _, weights, indices = out
    return x.reshape(-1, x.shape[-1]).detach(), weights.detach(), indices.detach()


def _expert_outputs(layer: MoELayer, x: Tensor, indices: Tensor) -> Tensor:
    """``(T, k, hidden)``: each routed expert's own output ``E_e(x_t)`` (before its gate weight),
    from the layer's experts module itself with every (token, slot) routed alone at weight 1."""
    t, k = indices.shape
    token = torch.arange(t, device=x.device).repeat_interleave(k)  # (T*k,)
    flat = indices.reshape(-1)  # (T*k,)
    experts = layer.module.experts
    if isinstance(experts, nn.ModuleList):
        y = x.new_zeros(t * k, x.shape[-1])  # (T*k, hidden)
        for e, expert in enumerate(experts):
            sel = (flat == e).nonzero().squeeze(1)
            if sel.numel():
                y[sel] = expert(x[token[sel]]).to(y.dtype)
    else:
        y = experts(x[token], flat[:, None], torch.ones(t * k, 1, dtype=x.dtype, device=x.device))
    return y.reshape(t, k, -1)


def _gated_norms(layers: list[MoELayer], model: nn.Module, data: CalibrationData | None, options: RunOptions,
                 method: str, token_weight: bool) -> tuple[list[Tensor], list[Tensor]]:
    """Per layer, float64 ``(experts,)`` sums over routed (token, expert) pairs of
    ``g_{e,t} * ||E_e(x_t)||_2`` (times ``s_t`` when ``token_weight``; see :func:`easy_ep`), and
    the number of tokens routed to each expert."""
    sums = [torch.zeros(la.count, dtype=torch.float64, device=la.router_weight.device) for la in layers]
    counts = [torch.zeros_like(s) for s in sums]

    def see(i: int, args: tuple, out: Any) -> None:
        x, w, idx = _routing(layers[i], args, out)  # (T, hidden), (T, k), (T, k)
        y = _expert_outputs(layers[i], x, idx).float()  # (T, k, hidden)
        c = w.float() * y.norm(dim=-1)  # (T, k): c_{e,t} for the routed experts
        if token_weight:
            routed = (w.float()[..., None] * y).sum(1)  # (T, hidden): the routed experts' output
            s = (1 - F.cosine_similarity(x.float(), x.float() + routed, dim=-1)).clamp(min=0)  # (T,)
            c = c * s[:, None]
        dev = sums[i].device
        sums[i].index_add_(0, idx.reshape(-1).to(dev), c.reshape(-1).double().to(dev))
        counts[i].index_add_(0, idx.reshape(-1).to(dev), torch.ones(idx.numel(), dtype=torch.float64, device=dev))

    _observe(model, layers, data, options, method, lambda la: la.router, see)
    return sums, counts


@EXPERT_SCORES.register("frequency",
                        paper="Lu et al. 2024, Not All Experts are Equal: Efficient Expert Pruning and Skipping for "
                              "Mixture-of-Experts Large Language Models")
def frequency(model: nn.Module, layers: list[MoELayer], data: CalibrationData | None, gen: torch.Generator,
              options: RunOptions) -> list[Tensor]:
    """Routing weight per expert on calibration data.

    Per layer, ``(experts,)`` routing weight summed over calibration tokens, the routers
    watched while the sequential runner computes each block."""
    mass = [torch.zeros(layer.count, dtype=torch.float64, device=layer.router_weight.device) for layer in layers]

    def see(i: int, args: tuple, out: Any) -> None:
        _, w, idx = _routing(layers[i], args, out)  # (T, k), (T, k)
        mass[i].index_add_(0, idx.reshape(-1).to(mass[i].device), w.reshape(-1).double().to(mass[i].device))

    _observe(model, layers, data, options, "frequency", lambda la: la.router, see)
    return [m.float().cpu() for m in mass]


@EXPERT_SCORES.register("reap", paper="Lasby et al. 2025, REAP: Router-weighted Expert Activation Pruning "
                                      "(One-shot MoE compression)")
def reap(model: nn.Module, layers: list[MoELayer], data: CalibrationData | None, gen: torch.Generator,
         options: RunOptions) -> list[Tensor]:
    """Mean gate weight x expert output norm over routed tokens.

    REAP's saliency: the mean, over the calibration tokens routed to expert ``e`` (``e`` in
    the token's top-k), of its gate weight times the L2 norm of its output,

        S_e = 1/|X_e| * sum_{t in X_e} g_{e,t} * ||E_e(x_t)||_2,

    ``g_{e,t}`` the weight the layer applies to ``E_e(x_t)`` (after any top-k renormalisation
    or scaling the model does), ``x_t`` the layer's input. An expert no token reaches scores 0.
    Per layer ``(experts,)`` float32 on the CPU."""
    sums, counts = _gated_norms(layers, model, data, options, "reap", token_weight=False)
    return [(s / c.clamp(min=1)).float().cpu() for s, c in zip(sums, counts)]


@EXPERT_SCORES.register("easy_ep", paper="Dong et al. 2025, Domain-Specific Pruning of Large Mixture-of-Experts "
                                         "Models with Few-shot Demonstrations (EASY-EP)")
def easy_ep(model: nn.Module, layers: list[MoELayer], data: CalibrationData | None, gen: torch.Generator,
            options: RunOptions) -> list[Tensor]:
    """Token-weighted sum of gated expert output norms.

    EASY-EP importance from a few (in-domain) demonstrations: output-aware expert importance
    ``c_{e,t} = g_{e,t} * ||E_e(x_t)||_2`` times the token's contribution
    ``s_t = max(0, 1 - cos(x_t, x_t + y_t))``, summed over every token routed to ``e``:

        I_e = sum_{t in X_e} s_t * g_{e,t} * ||E_e(x_t)||_2.

    ``x_t`` is the MoE layer's input (what the router sees, after the block's norm) and
    ``y_t = sum_{j in topk(t)} g_{j,t} E_j(x_t)`` the routed experts' output (shared experts
    excluded), so ``s_t`` is how far the routed experts turn the token's representation. The
    paper compares the representations before and after the routed experts; that is our
    reading of it, with the clamp at 0 of the authors' released selection script.
    Against :func:`reap`: a sum, not a mean, over routed tokens (so it grows with routing
    frequency), and every token weighted by ``s_t`` (REAP: weight 1). With ``s_t`` = 1 it is
    REAP times ``|X_e|``. Per layer ``(experts,)`` float32 on the CPU."""
    sums, _ = _gated_norms(layers, model, data, options, "easy_ep", token_weight=True)
    return [s.float().cpu() for s in sums]


class _Removed:
    """Within ``with``, experts ``drop`` of one layer are removed (:func:`remove_experts`);
    on exit every tensor, module list and count is put back as it was."""

    def __init__(self, layer: MoELayer, drop: list[int]) -> None:
        self.layer, self.drop = layer, drop

    def __enter__(self) -> MoELayer:
        la = self.layer
        experts = la.module.experts
        self.tensors = [t for t in experts.parameters(recurse=False)] + [t for _, t in _per_expert(la, la.count)]
        self.data = [t.data for t in self.tensors]
        self.experts = experts
        mods = (la.module, *la.router.modules(), experts)
        self.attrs = [(m, a, getattr(m, a)) for m in mods for a in (*EXPERT_ATTRS, "out_features")
                      if isinstance(getattr(m, a, None), int)]
        remove_experts(la.module, la, self.drop)
        return la

    def __exit__(self, *exc: Any) -> None:
        for t, d in zip(self.tensors, self.data):
            t.data = d
        self.layer.module.experts = self.experts
        for m, a, v in self.attrs:
            setattr(m, a, v)


def _layer_output(module: nn.Module, x: Tensor) -> Tensor:
    out = module(x)
    return out[0] if isinstance(out, (tuple, list)) else out


def greedy_removal(n: int, keep_at_least: int, error: Callable[[list[int]], float]) -> Tensor:
    """``(n,)`` scores from greedy removal: repeatedly drop the expert whose removal, with the
    ones already dropped, gives the smallest ``error(dropped)``; an expert's score is the
    step at which it went (0 first). The ``keep_at_least`` survivors score after every
    removed expert, in the order of their error in the last round. Ties go to the lower index."""
    scores = torch.zeros(n)
    dropped: list[int] = []
    last = torch.zeros(n, dtype=torch.float64)
    while n - len(dropped) > keep_at_least:
        candidates = [e for e in range(n) if e not in dropped]
        errors = torch.tensor([error(dropped + [e]) for e in candidates], dtype=torch.float64)  # (candidates,)
        last[candidates] = errors
        pick = candidates[int(errors.argmin())]
        scores[pick] = len(dropped)
        dropped.append(pick)
    survivors = [e for e in range(n) if e not in dropped]
    order = torch.argsort(last[survivors], stable=True).tolist()
    for rank, j in enumerate(order):
        scores[survivors[j]] = len(dropped) + rank
    return scores


@EXPERT_SCORES.register("greedy", paper="Lee et al. 2024, STUN: Structured-Then-Unstructured Pruning for Scalable "
                                        "MoE Pruning; Lu et al. 2024, Not All Experts are Equal")
def greedy(model: nn.Module, layers: list[MoELayer], data: CalibrationData | None, gen: torch.Generator,
           options: RunOptions) -> list[Tensor]:
    """Greedy removal order by layer-output reconstruction error.

    The greedy search of STUN's structured stage (Lu et al.'s enumeration, one expert at a
    time).

    Each MoE layer's calibration inputs ``X_b`` and dense outputs ``F(X_b)`` are cached while
    its block runs; then, with ``D`` the experts removed so far, the next one removed is

        argmin_e  sum_b ||F_{D+e}(X_b) - F(X_b)||_F^2,

    ``F_{D}`` the layer with experts ``D`` removed (its router rows too), which routes as the
    model does with their logits at -inf (renormalised over the remaining top-k as it would
    be). This is a selection procedure, not a per-expert score: the score is the removal
    order (see :func:`greedy_removal`), so pruning any ratio removes the first experts the
    greedy search chose; the search runs until only ``top_k`` experts remain, which costs
    about ``n^2 / 2`` layer forwards over the cached tokens per layer. Each layer is
    judged on the dense model's inputs. Per layer ``(experts,)`` float32 on the CPU."""
    cache: list[list[tuple[Tensor, Tensor]]] = [[] for _ in layers]
    scores = [torch.zeros(la.count) for la in layers]

    def see(i: int, args: tuple, out: Any) -> None:
        cache[i].append((args[0].detach(), (out[0] if isinstance(out, (tuple, list)) else out).detach()))

    def done(i: int) -> None:
        la = layers[i]
        pairs, cache[i] = cache[i], []
        if not pairs:  # the pass stopped early (an error on its way out): nothing to search
            return

        def error(drop: list[int]) -> float:
            with _Removed(la, drop):
                return sum(float((_layer_output(la.module, x).double() - y.double()).square().sum())
                           for x, y in pairs)

        top_k = int(getattr(la.router, "top_k", getattr(la.module, "top_k", 1)))
        scores[i] = greedy_removal(la.count, max(top_k, 1), error)

    _observe(model, layers, data, options, "greedy", lambda la: la.module, see, done)
    return scores


def _block_count(model: nn.Module) -> int:
    found = block_list(model)
    return len(found[1]) if found is not None else 1


@EXPERT_SCORES.register("router_norm")
def router_norm(model: nn.Module, layers: list[MoELayer], data: CalibrationData | None, gen: torch.Generator,
                options: RunOptions) -> list[Tensor]:
    """L2 norm of each expert's router row (data-free)."""
    return [layer.router_weight.detach().float().norm(dim=1) for layer in layers]


@EXPERT_SCORES.register("random")
def random_experts(model: nn.Module, layers: list[MoELayer], data: CalibrationData | None, gen: torch.Generator,
                   options: RunOptions) -> list[Tensor]:
    """Random expert scores: the control."""
    return [uniform_scores(layer.count, gen) for layer in layers]


def _per_expert(layer: MoELayer, n: int) -> list[tuple[str, Tensor]]:
    """Tensors with one entry per expert beside the experts themselves: every router parameter
    and buffer, and the layer's own vectors with ``n`` entries (AFMoE's ``expert_bias``,
    DeepSeek-style ``e_score_correction_bias``)."""
    prefix = layer.router_name + "."
    tensors = [(prefix + k, t) for k, t in (*layer.router.named_parameters(), *layer.router.named_buffers())]
    own = (*layer.module.named_parameters(recurse=False), *layer.module.named_buffers(recurse=False))
    return tensors + [(k, t) for k, t in own if t.dim() == 1 and t.shape[0] == n]


def remove_experts(model: nn.Module, layer: MoELayer, drop: list[int]) -> None:
    """Remove experts ``drop`` from one MoE layer in place: expert weights, router rows, counts."""
    n = layer.count
    keep = torch.tensor([e for e in range(n) if e not in set(drop)], dtype=torch.long)
    top_k = getattr(layer.router, "top_k", getattr(layer.module, "top_k", 1))
    if keep.numel() < max(int(top_k), 1):
        raise ConfigError(f"{layer.name}: keeping {keep.numel()} experts is fewer than top_k={top_k}")
    experts = layer.module.experts
    with torch.no_grad():
        if isinstance(experts, nn.ModuleList):
            layer.module.experts = nn.ModuleList([experts[i] for i in keep.tolist()])
        else:
            for p in experts.parameters(recurse=False):
                if p.shape[0] != n:
                    raise StructureError(f"{layer.name}.experts has a parameter whose first dim is not {n} experts")
                p.data = p.data.index_select(0, keep.to(p.device)).contiguous()
        for name, p in _per_expert(layer, n):
            dims = [d for d in range(p.dim()) if p.shape[d] == n]
            if not dims:
                raise StructureError(f"{layer.name}.{name} {tuple(p.shape)} has no dim of {n} experts; "
                                     "prunekit cannot resize this router")
            p.data = p.data.index_select(dims[0], keep.to(p.device)).contiguous()
    for m in layer.router.modules():
        if isinstance(m, nn.Linear):
            m.out_features = m.weight.shape[0]
    for m in (layer.module, *layer.router.modules(), experts):
        for attr in EXPERT_ATTRS:
            if isinstance(getattr(m, attr, None), int):
                setattr(m, attr, keep.numel())

"""Channel permutation for N:M sparsity: reorder a layer's input channels before its groups of
M are formed, so that each group holds channels whose weights are worth keeping side by side.

An N:M mask keeps the N best of every M *consecutive* input weights of a row. Which channels
share a group is an accident of the model's layout; a permutation ``perm`` of the inputs
(``W[:, perm] @ x[perm] == W @ x``) chooses the groups instead. The objective is the score
the mask keeps, ``sum over rows and groups of the top N scores``.

The search follows the two papers that use it for LLMs and CNNs:

- **start** (Zhang et al. 2024, RIA, "Plug-and-Play: An Efficient Post-training Pruning Method
  for Large Language Models", channel reallocation): sort the channels by their total score
  and deal them round-robin: with G groups, the G strongest channels land one in each group,
  the next G likewise, and so on;
- **improve** (Pool & Yu 2021, "Channel Permutations for N:M Sparsity", channel swaps): each
  round pairs the groups at random and, in every pair, makes the one swap of a channel of
  one group with a channel of the other that raises their kept score most, if any does.

The result is never worse than the identity: when the search ends below the layout's own
kept score, the identity is returned.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

#: rounds of pairwise swaps after the dealing (which gives most of the gain: on SmolLM2-135M
#: with Wanda scores, 0.064 -> 0.037 of the score lost by 2:4 in q_proj, 0.034 after 24 rounds)
DEFAULT_ROUNDS = 6
#: where a model keeps ``{layer name: (in,) input order}`` of its permuted N:M layers
PERMS_ATTR = "_prunekit_input_perms"
#: the file of a saved result that holds them (safetensors, one int64 tensor per layer name)
PERMUTATIONS_FILE = "prunekit_permutations.safetensors"


def input_permutations(model: nn.Module) -> dict[str, Tensor]:
    """The model's record of permuted layers, ``{name: (in,) int64}``, created empty on first
    use: layer ``name``'s N:M groups are formed over ``weight[:, perm]``. A sparse kernel needs
    the inputs in that order (``x[..., perm]``, or the permutation folded into the layer that
    produces x)."""
    perms = model.__dict__.get(PERMS_ATTR)
    if perms is None:
        perms = {}
        model.__dict__[PERMS_ATTR] = perms
    return perms


def kept_score(scores: Tensor, n: int, m: int) -> Tensor:
    """() the total score an N:M mask keeps on ``scores`` (out, in): the top ``n`` of every
    ``m`` consecutive inputs of each row."""
    out, cin = scores.shape
    return scores.reshape(out, cin // m, m).topk(n, dim=-1).values.sum()


def _kept_per_group(block: Tensor, n: int) -> Tensor:
    """(P,) kept score of each of P groups, ``block`` (out, P, m)."""
    return block.topk(n, dim=-1).values.sum(dim=(0, 2))


def channel_permutation(scores: Tensor, n: int, m: int, rounds: int = DEFAULT_ROUNDS,
                        generator: torch.Generator | None = None) -> Tensor:
    """(in,) int64 permutation of the inputs of ``scores`` (out, in), higher = more important,
    under which an ``n``:``m`` mask keeps at least as much score as without it."""
    scores = scores.float()
    cin = scores.shape[1]
    groups_n = cin // m
    order = scores.sum(0).argsort(descending=True)  # (in,) strongest channel first
    groups = order.reshape(m, groups_n).t().contiguous()  # (G, m): group g gets ranks g, G+g, 2G+g, ...
    total = float(kept_score(scores[:, groups.reshape(-1)], n, m))
    pairs = groups_n // 2
    for _ in range(rounds if pairs else 0):
        shuffled = torch.randperm(groups_n, generator=generator)[: 2 * pairs].to(scores.device)
        a, b = shuffled[:pairs], shuffled[pairs:]  # (P,) each: group a[p] meets group b[p]
        left, right = scores[:, groups[a]], scores[:, groups[b]]  # (out, P, m) each
        base = _kept_per_group(left, n) + _kept_per_group(right, n)  # (P,)
        best = torch.zeros_like(base)  # (P,) best gain found so far (none: 0)
        best_i = torch.zeros(pairs, dtype=torch.long, device=scores.device)
        best_j = torch.zeros_like(best_i)
        for i in range(m):
            for j in range(m):
                l2, r2 = left.clone(), right.clone()
                l2[:, :, i], r2[:, :, j] = right[:, :, j], left[:, :, i]
                gain = _kept_per_group(l2, n) + _kept_per_group(r2, n) - base  # (P,)
                better = gain > best
                best = torch.where(better, gain, best)
                best_i = torch.where(better, i, best_i)
                best_j = torch.where(better, j, best_j)
        move = best > 1e-7 * base.abs().clamp_min(1e-30)  # (P,) ignore gains at rounding level
        if not bool(move.any()):
            continue
        ga, gb, i, j = a[move], b[move], best_i[move], best_j[move]
        ca, cb = groups[ga, i].clone(), groups[gb, j].clone()
        groups[ga, i], groups[gb, j] = cb, ca
        gained = float(best[move].sum())
        total += gained
        if gained < 1e-6 * abs(total):
            break
    perm = groups.reshape(-1)
    if kept_score(scores[:, perm], n, m) <= kept_score(scores, n, m):
        return torch.arange(cin, device=scores.device)
    return perm


def is_nm_permuted(weight: Tensor, n: int, m: int, perm: Tensor | None) -> bool:
    """True when ``weight`` (out, in) has at most ``n`` nonzeros in every ``m`` consecutive
    inputs once its inputs are taken in the order ``perm`` (None: the layout's own)."""
    from .nm import is_nm

    return is_nm(weight if perm is None else weight[:, perm], n, m)

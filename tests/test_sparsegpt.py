"""SparseGPT against a naive OBS reference, and reconstruction quality against masking alone."""
import pytest
import torch

from prunekit.calibration.stats import InputStats
from prunekit.config import SparseGPTParams
from prunekit.patterns import MaskSpec, is_nm
from prunekit.reconstruct import RECONSTRUCTIONS, GroupProblem, Segment
from prunekit.scoring import SCORES, LayerStats


def correlated_inputs(n=512, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    return torch.randn(n, d, generator=g) @ mix + 0.1 * torch.randn(n, d, generator=g)  # (n, d)


def problem(w, x, spec, score="obs", blocksize=128, damp=0.01, segments=None):
    stats = InputStats(x.shape[1], gram=True, device=x.device)
    stats.add(x)
    segs = segments or (Segment(0, w.shape[0], spec),)
    return GroupProblem(w.clone(), segs, SCORES.get(score), LayerStats(input_norm=stats.input_norm), stats,
                        SparseGPTParams(blocksize=blocksize, damp=damp))


def naive_obs(w, h, pruned):
    """Column-by-column OBS with an explicit inverse over the not-yet-processed columns:
    remove column j's pruned weights, compensate with H_F^-1, drop j from F."""
    w = w.double().clone()
    h = h.double()
    d = h.shape[0]
    for j in range(d):
        f = list(range(j, d))
        hinv = torch.linalg.inv(h[f][:, f])  # (|F|, |F|)
        err = torch.where(pruned[:, j], w[:, j], torch.zeros_like(w[:, j])) / hinv[0, 0]  # (out,)
        w[:, j:] -= err[:, None] * hinv[0][None, :]
    return w.masked_fill(pruned, 0).float()


def damped(x, damp):
    h = x.T @ x / x.shape[0]
    return h + damp * h.diagonal().mean() * torch.eye(h.shape[0])


@pytest.mark.parametrize("blocksize", [4, 8, 32])
def test_matches_naive_obs_with_lazy_batches(blocksize):
    x = correlated_inputs()
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(1))
    new_w, pruned = RECONSTRUCTIONS.get("sparsegpt")(problem(w, x, MaskSpec("nm", n=2, m=4), blocksize=blocksize))
    ref = naive_obs(w, damped(x, 0.01), pruned)
    torch.testing.assert_close(new_w, ref, rtol=1e-4, atol=1e-4)


def test_nm_mask_is_blocksize_invariant():
    x = correlated_inputs()
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(2))
    a = RECONSTRUCTIONS.get("sparsegpt")(problem(w, x, MaskSpec("nm", n=2, m=4), blocksize=4))
    b = RECONSTRUCTIONS.get("sparsegpt")(problem(w, x, MaskSpec("nm", n=2, m=4), blocksize=32))
    assert torch.equal(a[1], b[1])
    torch.testing.assert_close(a[0], b[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec", [MaskSpec("unstructured", 0.5, "row"), MaskSpec("unstructured", 0.6, "layer"),
                                  MaskSpec("nm", n=2, m=4), MaskSpec("nm", n=4, m=8)])
def test_exact_sparsity_and_lower_error_than_masking(spec):
    x = correlated_inputs(d=64)
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(3))
    new_w, pruned = RECONSTRUCTIONS.get("sparsegpt")(problem(w, x, spec, blocksize=16))
    assert torch.equal(new_w == 0, pruned | (w == 0))
    if spec.kind == "nm":
        assert is_nm(new_w, spec.n, spec.m) and int(pruned.sum()) == w.numel() * (spec.m - spec.n) // spec.m
    elif spec.group == "row":
        assert (pruned.sum(1) == round(spec.amount * 64)).all()
    else:
        assert int(pruned.sum()) == round(spec.amount * w.numel())
    masked_w, _ = RECONSTRUCTIONS.get("none")(problem(w, x, spec, score="wanda"))
    err = lambda v: float(((x @ (v - w).T) ** 2).mean())  # noqa: E731
    assert err(new_w) < 0.9 * err(masked_w)


def test_segments_share_factor_but_not_counts():
    x = correlated_inputs()
    w = torch.randn(10, 32, generator=torch.Generator().manual_seed(4))
    segs = (Segment(0, 4, MaskSpec("unstructured", 0.25, "layer")), Segment(4, 10, MaskSpec("unstructured", 0.75, "layer")))
    _, pruned = RECONSTRUCTIONS.get("sparsegpt")(problem(w, x, None, segments=segs, blocksize=8))
    assert int(pruned[:4].sum()) == round(0.25 * 4 * 32) and int(pruned[4:].sum()) == round(0.75 * 6 * 32)


def test_dead_inputs_are_zeroed_and_finite():
    x = correlated_inputs()
    x[:, 5] = 0.0  # an input never active in calibration
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(5))
    new_w, pruned = RECONSTRUCTIONS.get("sparsegpt")(problem(w, x, MaskSpec("unstructured", 0.5, "row")))
    assert torch.isfinite(new_w).all()
    assert (new_w[:, 5] == 0).all() and pruned[:, 5].all()


def test_zero_sparsity_keeps_weights():
    x = correlated_inputs()
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(6))
    new_w, pruned = RECONSTRUCTIONS.get("sparsegpt")(problem(w, x, MaskSpec("unstructured", 0.0, "row")))
    assert not pruned.any()
    torch.testing.assert_close(new_w, w)


@pytest.mark.parametrize("dim", [7, 300, 576, 1536])
def test_blocked_gram_equals_full_product(dim):
    from prunekit.calibration.stats import add_gram

    x = torch.randn(64, dim, generator=torch.Generator().manual_seed(dim))
    gram = torch.ones(dim, dim)  # accumulates onto what is there
    add_gram(gram, x, part=128)
    torch.testing.assert_close(gram, 1 + x.T @ x, rtol=1e-5, atol=1e-4)

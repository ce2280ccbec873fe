"""Allocation rules on hand-built layers."""
import pytest
import torch

from prunekit.allocation import ALLOCATIONS, LayerRef
from prunekit.allocation.owl import outlier_ratios, owl_sparsities
from prunekit.config import Allocation


def ref(name, block, scores):
    return LayerRef(name, block, scores.numel(), lambda: scores)


def test_uniform():
    layers = [ref("a", 0, torch.rand(4, 4)), ref("b", 1, torch.rand(2, 8))]
    assert ALLOCATIONS.get("uniform")(layers, 0.3, Allocation()) == [0.3, 0.3]


def test_global_hand_computed():
    # 12 scores; 50% global prunes the six smallest: 1..6 -> four in "a", two in "b".
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 11.0, 12.0, 13.0]])
    b = torch.tensor([[5.0, 6.0], [20.0, 21.0]])
    amounts = ALLOCATIONS.get("global")([ref("a", 0, a), ref("b", 1, b)], 0.5, Allocation())
    assert amounts == pytest.approx([4 / 8, 2 / 4])


def test_global_shares_ties():
    a = torch.ones(10)
    b = torch.ones(30)
    amounts = ALLOCATIONS.get("global")([ref("a", 0, a), ref("b", 1, b)], 0.5, Allocation())
    assert amounts == pytest.approx([0.5, 0.5])


def test_global_total_is_target():
    g = torch.Generator().manual_seed(0)
    layers = [ref(f"l{i}", i, torch.rand(64, 32, generator=g) * (i + 1)) for i in range(5)]
    amounts = ALLOCATIONS.get("global")(layers, 0.6, Allocation())
    pruned = sum(a * l.numel for a, l in zip(amounts, layers))
    assert pruned == pytest.approx(0.6 * sum(l.numel for l in layers), abs=1.0)
    assert amounts == sorted(amounts, reverse=True)  # larger-scale layers keep more


def test_outlier_ratio_hand_computed():
    # Block 0: scores [1]*9 + [100]: mean 10.9, above 5*mean=54.5 -> 1 of 10.
    s0 = torch.tensor([1.0] * 9 + [100.0])
    s1 = torch.ones(10)
    r = outlier_ratios([ref("a", 0, s0), ref("b", 1, s1)], 5.0)
    assert r == {0: pytest.approx(0.1), 1: 0.0}


def test_owl_mean_and_range():
    ratios = torch.tensor([0.01, 0.05, 0.02, 0.08], dtype=torch.float64)
    s = owl_sparsities(ratios, 0.7, 0.08)
    assert float(s.mean()) == pytest.approx(0.7)
    assert float(s.max() - s.min()) == pytest.approx(0.16)
    assert int(s.argmin()) == 3 and int(s.argmax()) == 0  # most outliers -> pruned least


def test_owl_equal_ratios_is_uniform():
    s = owl_sparsities(torch.full((3,), 0.02, dtype=torch.float64), 0.5, 0.08)
    assert s.tolist() == pytest.approx([0.5] * 3)

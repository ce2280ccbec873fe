"""Patterns on hand-computed tensors: exact counts, lowest scores chosen, N:M validity."""
import pytest
import torch

from prunekit.errors import ConfigError
from prunekit.patterns import MaskSpec, is_nm, lowest_overall, lowest_per_row, nm_mask, unstructured_mask


def test_lowest_per_row_hand_computed():
    s = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.5, 0.7, 0.1, 0.9]])
    m = lowest_per_row(s, 2)
    assert m.tolist() == [[False, True, False, True], [True, False, True, False]]


def test_lowest_overall_hand_computed():
    s = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.5, 0.7, 0.1, 0.9]])
    m = lowest_overall(s, 3)
    assert m.tolist() == [[False, False, False, False], [True, True, True, False]]


def test_nm_hand_computed():
    s = torch.tensor([[1.0, 4.0, 2.0, 3.0, 8.0, 5.0, 7.0, 6.0]])
    assert nm_mask(s, 2, 4).tolist() == [[True, False, True, False, False, True, False, True]]
    assert nm_mask(s, 1, 4).tolist() == [[True, False, True, True, False, True, True, True]]
    assert nm_mask(s, 4, 8).tolist() == [[True, True, True, True, False, False, False, False]]


@pytest.mark.parametrize("amount", [0.0, 0.3, 0.5, 0.9])
def test_unstructured_exact_counts(amount):
    s = torch.rand(37, 53, generator=torch.Generator().manual_seed(0))
    half_up = lambda x: int(x + 0.5)  # noqa: E731 - the documented rule, by hand for these positive counts
    row = unstructured_mask(s, amount, "row")
    assert (row.sum(1) == half_up(amount * 53)).all()
    layer = unstructured_mask(s, amount, "layer")
    assert int(layer.sum()) == half_up(amount * s.numel())
    # Everything pruned scores no higher than everything kept.
    if 0 < amount:
        assert s[layer].max() <= s[~layer].min()


def test_nm_validity_and_exact_half():
    s = torch.randn(16, 64).abs()
    m = nm_mask(s, 2, 4)
    assert (m.view(16, 16, 4).sum(-1) == 2).all()
    w = s.masked_fill(m, 0)
    assert is_nm(w, 2, 4) and not is_nm(s, 2, 4)


def test_nm_rejects_indivisible():
    with pytest.raises(ConfigError, match="not divisible by M=4"):
        nm_mask(torch.rand(3, 6), 2, 4)


def test_maskspec_dispatch():
    s = torch.rand(8, 16)
    assert torch.equal(MaskSpec("nm", n=2, m=4).mask(s), nm_mask(s, 2, 4))
    assert torch.equal(MaskSpec("unstructured", 0.25, "layer").mask(s), unstructured_mask(s, 0.25, "layer"))


def test_one_rounding_rule():
    from prunekit.rounding import count

    assert [count(0.5, 15), count(0.5, 13), count(0.3, 10), count(0.25, 6), count(0.0, 9)] == [8, 7, 3, 2, 0]

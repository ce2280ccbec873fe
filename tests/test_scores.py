"""Scores on hand-computed tensors."""
import pytest
import torch

from prunekit.errors import CalibrationError
from prunekit.scoring import SCORES, LayerStats


def test_magnitude():
    w = torch.tensor([[-2.0, 1.0], [0.5, -0.25]])
    assert torch.equal(SCORES.get("magnitude")(w, LayerStats()), w.abs())


def test_wanda_hand_computed():
    w = torch.tensor([[-2.0, 1.0], [0.5, -0.25]])
    norm = torch.tensor([1.0, 10.0])
    s = SCORES.get("wanda")(w, LayerStats(input_norm=norm))
    assert s.tolist() == [[2.0, 10.0], [0.5, 2.5]]
    # The large input norm flips the ranking inside row 0 relative to magnitude.
    assert s[0].argmin() == 0 and w.abs()[0].argmin() == 1


def test_obs_hand_computed():
    w = torch.tensor([[2.0, 1.0]])
    d = torch.tensor([2.0, 0.5])
    assert SCORES.get("obs")(w, LayerStats(hinv_sqrt_diag=d)).tolist() == [[1.0, 4.0]]


def test_random_is_seeded():
    w = torch.zeros(4, 8)
    a = SCORES.get("random")(w, LayerStats(generator=torch.Generator().manual_seed(3)))
    b = SCORES.get("random")(w, LayerStats(generator=torch.Generator().manual_seed(3)))
    c = SCORES.get("random")(w, LayerStats(generator=torch.Generator().manual_seed(4)))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("name,missing", [("wanda", "input_norm"), ("obs", "hinv_sqrt_diag")])
def test_data_scores_need_stats(name, missing):
    with pytest.raises(CalibrationError, match=missing):
        SCORES.get(name)(torch.ones(2, 2), LayerStats())

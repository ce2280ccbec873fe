"""The short training runs data scores are computed from, and training on a pruned set
(optionally distilled from a teacher).

Datasets are any ``torch.utils.data.Dataset`` whose items are ``(x, y)`` pairs with an
integer class ``y``; everything streams through a ``DataLoader`` in batches, on the device
given.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: a hook called on every training batch: (example indices (B,), logits (B, C), labels (B,))
BatchHook = Callable[[Tensor, Tensor, Tensor], None]


@dataclass(frozen=True)
class TrainConfig:
    """Adam training: ``epochs``, ``batch_size``, ``lr``, ``device`` ("cpu", "cuda" ...),
    ``seed`` (initialisation and batch order)."""

    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or not self.lr > 0:
            raise ConfigError(f"epochs {self.epochs}, batch_size {self.batch_size}, lr {self.lr}: need epochs >= 0, "
                              "batch_size >= 1, lr > 0")


@dataclass(frozen=True)
class Distillation:
    """Knowledge distillation from a teacher while training on a pruned set (Hinton et al.
    2015; for data pruning, Ben-Baruch et al. 2024, Distilling the Knowledge in Data
    Pruning): loss = (1 − alpha) · CE + alpha · T² · KL(teacher_T ‖ student_T), the T²
    keeping the soft term's gradients on the scale of the hard one. ``teacher``: a model
    trained on the full set, run in eval mode on the student's device."""

    teacher: nn.Module
    alpha: float = 0.5
    temperature: float = 4.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0 or not self.temperature > 0:
            raise ConfigError(f"distillation alpha {self.alpha} must be in [0, 1] and temperature "
                              f"{self.temperature} > 0")


class Indexed(Dataset):
    """Items ``(index, x, y)`` of a labelled dataset, so hooks know which examples they saw."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        item = self.dataset[i]
        if isinstance(item, (tuple, list)) and len(item) == 2:
            return i, item[0], item[1]
        x = item[0] if isinstance(item, (tuple, list)) else item
        return i, x, -1  # unlabelled: only label-free scores read these


def check_labelled(dataset: Dataset, what: str) -> None:
    """``what`` (``"score 'el2n'"``, ``"training"``) needs ``(x, y)`` items with an integer class ``y``."""
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise DataError(f"{what}: the dataset is empty")
    item = dataset[0]
    ok = isinstance(item, (tuple, list)) and len(item) == 2
    y = item[1] if ok else None
    if ok and isinstance(y, Tensor):
        ok = y.numel() == 1 and not y.is_floating_point() and not y.dtype == torch.bool
    elif ok:
        ok = isinstance(y, int) and not isinstance(y, bool)
    if not ok:
        shape = f" of {len(item)}" if isinstance(item, (tuple, list)) else ""
        raise DataError(f"{what} needs labelled items (x, y) with an integer class y; dataset[0] is "
                        f"{type(item).__name__}{shape}. The labelled scores are el2n, grand and forgetting; "
                        "prototypes and random need no labels (lm_loss and ifd score text). Fix: give a dataset "
                        "of (x, y) pairs, e.g. TensorDataset(x, y) with y int64 class indices")


def labels_of(dataset: Dataset) -> Tensor:
    """(N,) int64 labels of a labelled dataset (tensor datasets fast, others item by item)."""
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None and len(tensors) == 2:
        return tensors[1].long().reshape(-1)
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])  # type: ignore[arg-type]


def _tensors(dataset: Dataset) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """(row indices into the tensors, x, y or None) when ``dataset`` is a TensorDataset or a
    Subset of one: batches are then sliced from the tensors, not collated item by item."""
    rows = None
    while isinstance(dataset, Subset):
        here = torch.as_tensor(dataset.indices, dtype=torch.long)
        rows = here if rows is None else here[rows]
        dataset = dataset.dataset
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) in (1, 2):
        x = dataset.tensors[0]
        y = dataset.tensors[1] if len(dataset.tensors) == 2 else None
        return (torch.arange(len(x)) if rows is None else rows), x, y
    return None


def loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int) -> Iterable[tuple[Tensor, Tensor, Tensor]]:
    """Batches ``(indices into dataset (B,), x, y)``, shuffled by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    fast = _tensors(dataset)
    if fast is None:
        return DataLoader(Indexed(dataset), batch_size=batch_size, shuffle=shuffle, generator=gen)
    rows, x, y = fast
    order = torch.randperm(len(rows), generator=gen) if shuffle else torch.arange(len(rows))
    return _Slices(order, rows, x, y, batch_size)


@dataclass(frozen=True)
class _Slices:
    """Batches sliced from a TensorDataset's tensors (``len`` gives their number, for tqdm)."""

    order: Tensor  # (N,) positions into rows, in batch order
    rows: Tensor  # (N,) rows of the tensors
    x: Tensor
    y: Tensor | None
    batch_size: int

    def __len__(self) -> int:
        return (len(self.order) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        for start in range(0, len(self.order), self.batch_size):
            idx = self.order[start: start + self.batch_size]
            r = self.rows[idx]
            yield idx, self.x[r], (self.y[r] if self.y is not None else torch.full((len(idx),), -1))


def _loss(logits: Tensor, y: Tensor, x: Tensor, kd: Distillation | None) -> Tensor:
    ce = F.cross_entropy(logits, y)
    if kd is None or kd.alpha == 0:
        return ce
    with torch.no_grad():
        teacher = kd.teacher(x)  # (B, C)
    t = kd.temperature
    kl = F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                  reduction="batchmean")
    return (1 - kd.alpha) * ce + kd.alpha * t * t * kl


def train(model: nn.Module, dataset: Dataset, config: TrainConfig = TrainConfig(), *,
          indices: Sequence[int] | Tensor | None = None, distill: Distillation | None = None,
          on_batch: BatchHook | None = None, progress: bool = False) -> nn.Module:
    """Train ``model`` with Adam on ``dataset`` (or on its ``indices``: a pruned set), with
    cross-entropy, or distilled from ``distill.teacher``. ``on_batch`` sees every batch's
    example indices (into ``dataset``), logits and labels. Returns the model, trained in place."""
    check_labelled(dataset, "training")
    data = Subset(dataset, [int(i) for i in indices]) if indices is not None else dataset
    if len(data) == 0:  # type: ignore[arg-type]
        raise DataError("nothing to train on: the pruned set is empty")
    device = torch.device(config.device)
    model.to(device).train()
    if distill is not None:
        distill.teacher.to(device).eval()
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    back = torch.as_tensor(indices).long() if indices is not None else None
    for epoch in tqdm(range(config.epochs), desc="train", unit="epoch", disable=not progress, leave=False):
        for idx, x, y in loader(data, config.batch_size, True, config.seed * 1000 + epoch):
            x, y = x.to(device), y.to(device).long()
            logits = model(x)  # (B, C)
            loss = _loss(logits, y, x, distill)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if on_batch is not None:
                on_batch(back[idx] if back is not None else idx, logits.detach(), y)
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, dataset: Dataset, batch_size: int = 512, device: str = "cpu",
            progress: bool = False) -> Tensor:
    """(N, C) float32 logits of ``model`` over the whole dataset, streamed in batches."""
    model.to(device).eval()
    out = []
    for _, x, _ in tqdm(loader(dataset, batch_size, False, 0), desc="predict", unit="batch", disable=not progress,
                        leave=False):
        out.append(model(x.to(device)).float().cpu())
    return torch.cat(out)


def accuracy(model: nn.Module, dataset: Dataset, batch_size: int = 512, device: str = "cpu") -> float:
    """Top-1 accuracy of ``model`` on a labelled dataset."""
    return float((predict(model, dataset, batch_size, device).argmax(-1) == labels_of(dataset)).float().mean())


__all__ = ["Distillation", "TrainConfig", "accuracy", "check_labelled", "labels_of", "predict", "train"]

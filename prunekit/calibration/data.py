"""One calibration-data type for every capability: one-shot pruning, structural scores,
pruning at initialisation.

:class:`CalibrationData` holds ready batches and knows how to run a forward and a loss on a
model. It is built from token windows ``(N, T)`` (a causal LM), an ``(inputs, labels)`` pair
(a classifier: cross-entropy), inputs alone (no loss), a list of keyword-argument dicts, a
``DataLoader`` (or any iterable of such items), or a text spec (``default``, a file, a hub
dataset) with a tokenizer. Batches stay where they were given (usually the CPU) and are moved
to the device of the module that consumes them, one batch at a time.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Callable, Iterable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CalibrationError, ConfigError, DataError

Kind = Literal["tokens", "pairs", "inputs", "dicts"]


@dataclass(frozen=True, eq=False)
class Batch:
    """One forward's arguments, ``model(*args, **kwargs)``, and its labels for a loss."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    target: Tensor | None = None

    def to(self, device: torch.device | str | None) -> Batch:
        if device is None:
            return self
        return Batch(move(self.args, device), move(self.kwargs, device), move(self.target, device))

    @property
    def size(self) -> int:
        """Samples in the batch (the first dim of its first tensor)."""
        first = next((t for t in (*self.args, *self.kwargs.values()) if isinstance(t, Tensor)), None)
        return int(first.shape[0]) if first is not None and first.dim() > 0 else 1

    def samples(self) -> list[Batch]:
        """The batch split into batches of one sample: every tensor whose first dim is the
        batch's size is sliced, everything else is shared."""
        n = self.size
        if n == 1:
            return [self]
        cut = lambda obj, i: slice_first(obj, i, n)  # noqa: E731
        return [Batch(cut(self.args, i), cut(self.kwargs, i), cut(self.target, i)) for i in range(n)]


#: loss_fn(model, batch) -> scalar loss, when the default does not fit
LossFn = Callable[[nn.Module, Batch], Tensor]


def slice_first(obj: Any, i: int, n: int) -> Any:
    """``obj`` with every tensor of first dim ``n`` inside (tuples, lists, dicts) cut to row ``i``."""
    if isinstance(obj, Tensor):
        return obj[i : i + 1] if obj.dim() > 0 and obj.shape[0] == n else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(slice_first(o, i, n) for o in obj)
    if isinstance(obj, dict):
        return {k: slice_first(v, i, n) for k, v in obj.items()}
    return obj


def move(obj: Any, device: torch.device | str) -> Any:
    """``obj`` with every tensor inside (tuples, lists, dicts) moved to ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple):
        return tuple(move(o, device) for o in obj)
    if isinstance(obj, list):
        return [move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: move(v, device) for k, v in obj.items()}
    return obj


@lru_cache(maxsize=None)
def _accepts(cls: type, name: str) -> bool:
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@dataclass(frozen=True, eq=False)
class CalibrationData:
    """Calibration batches and how to run them.

    ``kind``: ``tokens`` (``input_ids`` windows of a causal LM; the loss is next-token
    cross-entropy), ``pairs`` (inputs and labels; cross-entropy), ``inputs`` (no loss) or
    ``dicts`` (keyword arguments; the loss is the model's own ``.loss``). ``loss_fn``
    overrides the loss. ``device``: where batches go for a forward (None: the model's device).
    """

    batches: tuple[Batch, ...]
    kind: Kind
    loss_fn: LossFn | None = None
    device: torch.device | None = None

    def __post_init__(self) -> None:
        if not self.batches:
            raise DataError("calibration data is empty: give at least one batch")

    # -- construction --------------------------------------------------------------
    @classmethod
    def from_ids(cls, ids: Tensor, batch_size: int | None = None, **kw: Any) -> CalibrationData:
        """Token windows ``(N, T)`` of a causal LM, ``batch_size`` windows per batch."""
        if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] < 2 or ids.is_floating_point():
            raise DataError(f"token ids must be an integer tensor of shape (nsamples, seqlen >= 2), got "
                            f"{ids.dtype} {tuple(ids.shape)}")
        return cls(tuple(Batch(kwargs={"input_ids": c}) for c in ids.split(batch_size or ids.shape[0])), "tokens", **kw)

    @classmethod
    def from_pairs(cls, inputs: Tensor, labels: Tensor, batch_size: int | None = None, **kw: Any) -> CalibrationData:
        if inputs.shape[0] != labels.shape[0]:
            raise DataError(f"inputs ({inputs.shape[0]}) and labels ({labels.shape[0]}) differ in length")
        n = batch_size or inputs.shape[0]
        return cls(tuple(Batch((x,), target=y) for x, y in zip(inputs.split(n), labels.split(n))), "pairs", **kw)

    @classmethod
    def from_inputs(cls, inputs: Tensor, batch_size: int | None = None, **kw: Any) -> CalibrationData:
        return cls(tuple(Batch((x,)) for x in inputs.split(batch_size or inputs.shape[0])), "inputs", **kw)

    @classmethod
    def from_text(cls, tokenizer: Any, spec: str, nsamples: int, seqlen: int, seed: int = 0,
                  batch_size: int | None = None, **kw: Any) -> CalibrationData:
        """``nsamples`` random windows of ``seqlen`` tokens of a text spec's calibration split."""
        from .text import calibration_windows, load_text, tokenize

        ids = calibration_windows(tokenize(tokenizer, load_text(spec, "calib")), nsamples, seqlen, seed)
        return cls.from_ids(ids, batch_size, **kw)

    @classmethod
    def from_items(cls, items: Iterable[Any], limit: int | None = None, **kw: Any) -> CalibrationData:
        """Ready batches from a list or a DataLoader: dicts of keyword arguments, ``(inputs,
        labels)`` pairs, or input tensors (token ids when integer and 2-D). ``limit``: at most
        this many batches."""
        batches, kinds = [], set()
        for item in items:
            if limit is not None and len(batches) >= limit:
                break
            kind, batch = _item(item)
            kinds.add(kind)
            batches.append(batch)
        if len(kinds) > 1:
            raise DataError(f"calibration batches mix kinds {sorted(kinds)}; give batches of one kind")
        if not batches:
            raise DataError("calibration data is empty: give at least one batch")
        return cls(tuple(batches), kinds.pop(), **kw)

    # -- running -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)

    @property
    def samples(self) -> int:
        return sum(b.size for b in self.batches)

    @property
    def ids(self) -> Tensor | None:
        """``(N, T)`` token ids of ``tokens`` data, else None."""
        if self.kind != "tokens":
            return None
        return torch.cat([b.kwargs["input_ids"] for b in self.batches])

    def with_loss(self, loss_fn: LossFn | None) -> CalibrationData:
        return self if loss_fn is None else replace(self, loss_fn=loss_fn)

    def prepared(self, model: nn.Module, batch: Batch) -> Batch:
        """``batch`` on the forward's device, with ``use_cache=False`` for models that cache."""
        batch = batch.to(self.device or model_device(model))
        if self.kind == "tokens" and _accepts(type(model), "use_cache") and "use_cache" not in batch.kwargs:
            batch = Batch(batch.args, {**batch.kwargs, "use_cache": False}, batch.target)
        return batch

    def forward(self, model: nn.Module, batch: Batch) -> Any:
        b = self.prepared(model, batch)
        return model(*b.args, **b.kwargs)

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """The scalar training loss of ``model`` on ``batch``."""
        if self.loss_fn is not None:
            return self.loss_fn(model, batch)
        b = self.prepared(model, batch)
        if self.kind == "tokens":
            ids = b.kwargs["input_ids"]
            if _accepts(type(model), "labels"):
                return model(*b.args, **b.kwargs, labels=ids).loss
            logits = _logits(model(*b.args, **b.kwargs))  # (B, T, vocab)
            return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        if self.kind == "pairs":
            return F.cross_entropy(_logits(model(*b.args, **b.kwargs)).float(), b.target)
        if self.kind == "dicts":
            out = model(*b.args, **b.kwargs)
            loss = getattr(out, "loss", None)
            if loss is not None:
                return loss
        raise ConfigError(f"{self.kind} calibration data has no loss: pass (inputs, labels) pairs, dicts with "
                          "'labels', or loss_fn(model, batch) -> scalar")

    def trace_inputs(self, model: nn.Module, rows: int = 1, tokens: int = 64) -> Any:
        """A small example for one traced forward: a dict of keyword arguments, or a tuple of
        positional ones, on the model's device."""
        b = self.prepared(model, self.example(rows, tokens))
        return dict(b.kwargs) if b.kwargs else tuple(b.args)

    def example(self, rows: int = 1, tokens: int = 64) -> Batch:
        """A small input for tracing, cut from the first batch (``rows`` samples, ``tokens``
        positions of 2-D token tensors)."""
        b = self.batches[0]

        def cut(t: Any) -> Any:
            if not isinstance(t, Tensor) or t.dim() == 0:
                return t
            t = t[:rows]
            return t[:, :tokens] if t.dim() == 2 and not t.is_floating_point() else t

        return Batch(tuple(cut(a) for a in b.args), {k: cut(v) for k, v in b.kwargs.items()})


def _logits(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise CalibrationError(f"cannot find logits in a model output of type {type(out).__name__}; pass loss_fn=...")


def _item(item: Any) -> tuple[Kind, Batch]:
    if isinstance(item, Batch):
        return ("pairs" if item.target is not None else "dicts" if item.kwargs else "inputs"), item
    if isinstance(item, dict):
        return "dicts", Batch(kwargs=dict(item))
    if isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(t, Tensor) for t in item):
        return "pairs", Batch((item[0],), target=item[1])
    if isinstance(item, Tensor):
        if item.dim() == 2 and not item.is_floating_point():
            return "tokens", Batch(kwargs={"input_ids": item})
        return "inputs", Batch((item,))
    raise DataError(f"a calibration batch of type {type(item).__name__} is not understood; give dicts of keyword "
                    "arguments, (inputs, labels) pairs or tensors")


def as_calibration(data: Any, batch_size: int | None = None, *, tokenizer: Any = None,
                   nsamples: int = 32, seqlen: int = 512, seed: int = 0,
                   loss_fn: LossFn | None = None) -> CalibrationData:
    """Coerce what a user passes into :class:`CalibrationData`.

    Token ids ``(N, T)``; a float tensor of inputs; an ``(inputs, labels)`` tuple; a list or
    DataLoader of ready batches; a text spec string (with ``tokenizer``); or a
    CalibrationData (returned as is, with ``loss_fn`` if given).
    """
    if isinstance(data, CalibrationData):
        return data.with_loss(loss_fn)
    if isinstance(data, str):
        if tokenizer is None:
            raise DataError(f"calibration text {data!r} needs a tokenizer; pass tokenizer=... or token ids")
        return CalibrationData.from_text(tokenizer, data, nsamples, seqlen, seed, batch_size, loss_fn=loss_fn)
    if isinstance(data, Tensor):
        if data.dim() == 2 and not data.is_floating_point():
            return CalibrationData.from_ids(data, batch_size, loss_fn=loss_fn)
        return CalibrationData.from_inputs(data, batch_size, loss_fn=loss_fn)
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        return CalibrationData.from_pairs(data[0], data[1], batch_size, loss_fn=loss_fn)
    if isinstance(data, (list, tuple)) or _is_iterable(data):
        return CalibrationData.from_items(data, loss_fn=loss_fn)
    raise DataError(f"calibration data of type {type(data).__name__} is not understood; pass token ids (N, T), a "
                    "tensor of inputs, an (inputs, labels) pair, a list or DataLoader of batches, or a text spec")


def _is_iterable(obj: Any) -> bool:
    return isinstance(obj, (torch.utils.data.DataLoader, Sequence)) or hasattr(obj, "__iter__")


__all__ = ["CalibrationData", "Batch", "LossFn", "as_calibration", "move", "model_device"]

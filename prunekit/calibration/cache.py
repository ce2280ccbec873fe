"""Where block inputs wait between blocks: one tensor per calibration batch.

``offload="none"`` keeps them where the block runs; ``"cpu"`` keeps them in CPU memory while
blocks run on an accelerator (activation memory on the device is then one batch's);
``"disk"`` writes them to memory-mapped files in a temporary directory. A batch is *taken*
out of the cache for its forward and its output *put* back, so the cache never holds a
batch's input while that batch is being computed.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

Offload = Literal["none", "cpu", "disk"]


def _hidden_dir() -> Path:
    """A fresh directory for memory-mapped hidden states; those of killed runs are removed."""
    import os

    from ..atomic import clean_stale

    root = Path(tempfile.gettempdir())
    clean_stale(root / "prunekit-hidden")
    return Path(tempfile.mkdtemp(prefix=f".prunekit-hidden.tmp-{os.getpid()}-", dir=root))
OFFLOADS = ("none", "cpu", "disk")


class _DiskTensor:
    """A tensor saved to a raw file and memory-mapped back on demand."""

    def __init__(self, path: Path, t: Tensor) -> None:
        self.path, self.shape, self.dtype = path, tuple(t.shape), t.dtype
        raw = t.detach().contiguous().cpu().view(torch.uint8).numpy()
        raw.tofile(path)

    def load(self, device: torch.device) -> Tensor:
        raw = np.memmap(self.path, dtype=np.uint8, mode="r")
        t = torch.from_numpy(np.array(raw)).view(self.dtype).view(self.shape)  # copy: the file may be reused
        del raw
        return t.to(device)


class HiddenCache:
    """Per-batch hidden states, stored according to ``offload`` and served on ``device``."""

    def __init__(self, device: torch.device, offload: Offload = "none") -> None:
        if offload not in OFFLOADS:
            raise ValueError(f"offload must be one of {OFFLOADS}, got {offload!r}")
        self.device, self.offload = device, offload
        self._items: dict[int, Tensor | _DiskTensor] = {}
        self._dir: Path | None = _hidden_dir() if offload == "disk" else None
        self._version = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, index: int, t: Tensor) -> None:
        if self.offload == "disk":
            assert self._dir is not None
            old = self._items.get(index)
            if isinstance(old, _DiskTensor):
                old.path.unlink(missing_ok=True)
            self._version += 1
            self._items[index] = _DiskTensor(self._dir / f"{index}-{self._version}.bin", t)
            return
        self._items[index] = t.detach().to("cpu" if self.offload == "cpu" else self.device)

    def peek(self, index: int) -> Tensor:
        """Batch ``index`` on the compute device, leaving it in the cache."""
        item = self._items[index]
        return item.load(self.device) if isinstance(item, _DiskTensor) else item.to(self.device)

    def take(self, index: int) -> Tensor:
        """Batch ``index`` on the compute device, removed from the cache."""
        item = self._items.pop(index)
        if isinstance(item, _DiskTensor):
            t = item.load(self.device)
            item.path.unlink(missing_ok=True)
            return t
        return item.to(self.device)

    def close(self) -> None:
        self._items.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> HiddenCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

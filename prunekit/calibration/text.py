"""Text sources for calibration and evaluation: a local file, ``default`` (the bundled
corpus of Python standard-library docstrings, split into disjoint calibration and
evaluation parts), or a hub dataset name for users with internet."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from ..errors import DataError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
Split = Literal["calib", "eval"]

# name -> (dataset, config, text column, {split: hub split})
HUB_ALIASES = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "text", {"calib": "train", "eval": "test"}),
    "c4": ("allenai/c4", "en", "text", {"calib": "validation", "eval": "validation"}),
}


def _read_hub(name: str, split: Split) -> str:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{name!r} is neither a local file nor 'default'; to use a hub dataset install the "
            "'datasets' package (and have internet)"
        ) from None
    dataset, config, column, splits = HUB_ALIASES.get(name, (name, None, "text", {"calib": "train", "eval": "test"}))
    try:
        ds = datasets.load_dataset(dataset, config, split=splits[split])
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"could not load hub dataset {name!r}: {exc}") from exc
    return "\n\n".join(t for t in ds[column] if t)


def load_text(spec: str, split: Split = "eval") -> str:
    """Return the text named by ``spec``."""
    if spec == "default":
        return (ASSETS / f"stdlib_docstrings.{split}.txt").read_text(encoding="utf-8")
    path = Path(spec).expanduser()
    if path.is_file():
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise DataError(f"text file {spec} is empty")
        return text
    if path.exists():
        raise DataError(f"{spec} is not a regular text file")
    if spec.startswith((".", "/", "~")) or spec.endswith((".txt", ".md", ".rst")):
        raise DataError(f"text file {spec} does not exist")
    return _read_hub(spec, split)


def tokenize(tokenizer: object, text: str) -> Tensor:
    """(tokens,) int64 ids of the whole text, without the model's length warning."""
    if tokenizer is None:
        raise DataError("the model has no tokenizer; save one next to it or pass token ids through the API")
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]  # (tokens,)
    if ids.numel() == 0:
        raise DataError("the text has no tokens")
    return ids


def calibration_windows(ids: Tensor, nsamples: int, seqlen: int, seed: int) -> Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens from (tokens,) ids -> (nsamples, seqlen)."""
    if ids.numel() < seqlen:
        raise DataError(
            f"calibration text has {ids.numel()} tokens, fewer than one window of --seqlen {seqlen}; "
            "use a longer text or a smaller --seqlen"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])

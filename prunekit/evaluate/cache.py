"""The dense model's perplexity, computed once per model + text + windows + dtype + device
and kept in ``$PRUNEKIT_CACHE/eval/`` (a small JSON file each), so every ``--eval`` run can
show before → after without evaluating the dense model again.

A local model or text is identified by its files' names, sizes and modification times (a
changed file is a new entry); a hub id or dataset name by the name itself."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable

from .perplexity import Perplexity

log = logging.getLogger(__name__)


def _stamp(path: Path) -> list[Any]:
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) if path.is_dir() else [path]
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def fingerprint(spec: str) -> Any:
    """What identifies a model source or text spec: its files' stamps, or the name."""
    path = Path(spec).expanduser()
    if path.exists():
        return [str(path.resolve()), _stamp(path)]
    return spec


def eval_key(model_source: str, text: str, seqlen: int, max_tokens: int | None, dtype: str, device: str) -> str:
    from ..calibration.text import ASSETS

    text_id = fingerprint(str(ASSETS / "stdlib_docstrings.eval.txt")) if text == "default" else fingerprint(text)
    blob = json.dumps([fingerprint(model_source), text_id, seqlen, max_tokens, dtype, device], default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cached_perplexity(key: str, compute: Callable[[], Perplexity]) -> tuple[Perplexity, bool]:
    """``(perplexity, was_cached)``: the stored value under ``key``, or ``compute()`` stored."""
    from ..atomic import write_text_atomically
    from ..models.loading import cache_root

    path = cache_root() / "eval" / f"{key}.json"
    if path.is_file():
        try:
            return Perplexity(**json.loads(path.read_text(encoding="utf-8"))), True
        except (ValueError, TypeError) as exc:
            log.warning("ignoring unreadable cached evaluation %s: %s", path, exc)
    value = compute()
    try:
        write_text_atomically(path, json.dumps(value.__dict__) + "\n")
    except OSError as exc:  # a read-only cache costs a recomputation next time, nothing more
        log.warning("could not cache the dense evaluation in %s: %s", path, exc)
    return value, False

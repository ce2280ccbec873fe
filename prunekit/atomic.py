"""Directories that appear whole or not at all."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def write_dir_atomically(dest: Path, write: Callable[[Path], None], *, replace: bool) -> Path:
    """Run ``write(tmp)`` on a temporary sibling of ``dest``, then rename it to ``dest``.

    If ``dest`` exists: with ``replace`` it is swapped out and deleted; without, the existing
    one is kept (another process finished the same work first). On any error the temporary
    directory is removed and ``dest`` is untouched.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        write(tmp)
        if not dest.exists():
            tmp.rename(dest)
        elif replace:
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest

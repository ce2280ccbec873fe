"""Directories and files that appear whole or not at all.

A directory is written under a temporary sibling ``.NAME.tmp-PID-XXXX`` and renamed into
place. A process killed with SIGKILL cannot remove its temporary directory, so the next write
to the same place (or :func:`clean_stale`, which ``check_output`` runs before any work)
removes every temporary sibling whose process is gone. Finished directories get the
permissions of a normal ``mkdir`` (``0777 & ~umask``), not ``mkdtemp``'s 0700.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale(dest: Path) -> list[Path]:
    """Remove the temporary siblings of ``dest`` left by processes that no longer run;
    returns what was removed."""
    parent = Path(dest).parent
    if not parent.is_dir():
        return []
    stale = re.compile(rf"^\.{re.escape(Path(dest).name)}\.(?:tmp|old)-(\d+)(?:-|$)")
    removed = []
    for entry in parent.iterdir():
        m = stale.match(entry.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            log.warning("removing %s, left by a run that was killed (pid %s)", entry, m.group(1))
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_dir_atomically(dest: Path, write: Callable[[Path], None], *, replace: bool) -> Path:
    """Run ``write(tmp)`` on a temporary sibling of ``dest``, then rename it to ``dest``.

    If ``dest`` exists: with ``replace`` it is swapped out and deleted; without, the existing
    one is kept (another process finished the same work first). On any error, Ctrl-C
    included, the temporary directory is removed and ``dest`` is untouched.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=dest.parent))
    try:
        write(tmp)
        mode = 0o777 & ~_umask()
        for root, dirs, _ in os.walk(tmp):
            for d in dirs:
                os.chmod(os.path.join(root, d), mode)
        os.chmod(tmp, mode)
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


def write_text_atomically(dest: Path, text: str) -> Path:
    """Write ``text`` to ``dest`` through a temporary file in the same directory (those that
    killed runs left for ``dest`` are removed first)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=dest.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest

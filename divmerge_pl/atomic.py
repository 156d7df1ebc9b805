"""Files and folders written whole or not at all.

Each is written under a temporary name beside its final place and renamed there once complete,
so a run killed or failing mid-write never leaves something that looks finished (a later run
would take it for a finished result); on an error the temporary is removed. The temporary gets
the mode a plain ``open``/``mkdir`` would give under the umask (``tempfile`` alone makes 0600
files and 0700 folders, which nobody else on a shared machine could read).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(tree: Path) -> None:
    """Give ``tree`` and everything in it the modes a plain ``open``/``mkdir`` would: safetensors
    0.8 writes its files 0600 through a temporary file (safetensors/safetensors#782), ``mkdtemp``
    makes 0700, and a model nobody else can read is no use on a shared machine or in a container."""
    mask = current_umask()
    for path in [tree, *tree.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success it replaces ``path`` (a folder
    standing there is removed first), on an error it is removed. Parents are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~current_umask())
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())  # again: a writer may have replaced it (safetensors)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)  # a file standing there is replaced in one step
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling folder of ``path`` to fill; on success it replaces
    ``path`` (whatever stands there is removed first), on an error it is removed with all it
    holds. Parents are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~current_umask())
    try:
        yield tmp
        _remove(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)

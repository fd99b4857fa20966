"""Atomic writes: a directory or a file appears complete at its path or not at all.

``write_dir_atomically(path, write)`` calls ``write(tmp)`` on a fresh temp directory beside ``path``, then renames it
into place; an older ``path`` is replaced only after ``write`` succeeded (it is moved aside, the new one renamed in,
then the old one deleted; if the rename fails the old one is put back). On any failure the temp directory is removed
and the exception propagates (callers turn ``OSError`` into the error their users should see).
``write_file_atomically(path, data)`` does the same for one file (text or bytes, via a temp file + ``os.replace``).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable


def _sibling(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{os.getpid()}"


def write_dir_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)`` then rename ``tmp_dir`` to ``path`` (replacing an older ``path``). On any failure the
    temp dir is removed and ``path`` is as it was. Creates ``path``'s parent. Returns ``path``."""
    path = Path(path)
    tmp = _sibling(path, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        if path.exists():
            old = _sibling(path, "old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)  # put the previous one back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def write_file_atomically(path: str | os.PathLike, data: str | bytes, encoding: str = "utf-8") -> Path:
    """Write ``data`` to a temp file beside ``path`` and rename it into place; on failure the temp file is removed
    and ``path`` is as it was. Returns ``path``."""
    path = Path(path)
    tmp = _sibling(path, "tmp")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding=encoding)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path

"""Atomic writes: a directory or a file appears complete at its path or not at all, and nothing is left behind.

``write_dir_atomically(path, write)`` calls ``write(tmp)`` on a fresh temp directory ``.NAME.tmp-PID`` beside
``path``, fsyncs every file in it and the directory itself, then renames it into place and fsyncs the parent; an
older ``path`` is replaced only after ``write`` succeeded (it is moved aside to ``.NAME.old-PID``, the new one renamed
in, then the old one deleted; if the rename fails the old one is put back). On any failure the temp directory is
removed and the exception propagates (callers turn ``OSError`` into the error their users should see).
``write_file_atomically(path, data)`` does the same for one file (temp file ``.NAME.tmp-PID``, fsync, ``os.replace``,
fsync of the directory).

A killed process cannot clean up, so ``remove_stale(directory)`` removes the temp entries (names matching
``TEMP_NAME``, nothing else) whose owner process is gone; writers call it when they start. A ``.NAME.old-PID`` (this
module's, without a random suffix) whose ``NAME`` is missing (killed between the two renames) is renamed back to
``NAME`` instead of being deleted.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import socket
from contextlib import suppress
from pathlib import Path
from typing import Callable

# ``.NAME.tmp-PID`` / ``.NAME.old-PID``, optionally ``.HOST`` after the PID (``owner_tag``: for directories that
# processes on several machines share, such as the weight cache) and ``-XXXXXXXX`` (tempfile.mkdtemp's suffix)
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>[0-9]+)(?:\.(?P<host>[A-Za-z0-9]+))?"
                       r"(?P<random>-[a-z0-9_]{8})?$")
HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:40] or "host"
_NO_DIR_FSYNC = {errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES, errno.EISDIR}


def _sibling(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{os.getpid()}"


def owner_tag() -> str:
    """``PID.HOST`` for temp names in a directory several machines may share: ``remove_stale`` then leaves the
    entries of other machines alone (their PIDs mean nothing here)."""
    return f"{os.getpid()}.{HOST}"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (``os.kill(pid, 0)``: ESRCH means gone; EPERM means it exists
    but belongs to another user)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno != errno.ESRCH
    return True


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename into it) to disk; a no-op where the OS cannot fsync directories."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        if e.errno in _NO_DIR_FSYNC:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _NO_DIR_FSYNC:
            raise
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file under ``root``, then every directory (deepest first), so a rename of ``root`` that reaches
    the disk never exposes files whose contents did not."""
    dirs = []
    for here, _, files in os.walk(root):
        dirs.append(here)
        for name in files:
            fd = os.open(os.path.join(here, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for here in reversed(dirs):
        fsync_dir(here)


def remove_stale(directory: str | os.PathLike) -> list[Path]:
    """Remove the temp entries in ``directory`` (``.NAME.tmp-PID``, ``.NAME.old-PID``, the patterns this module and
    the weight cache write) whose process ``PID`` is gone; an ``.old`` one whose ``NAME`` is missing is renamed back
    to ``NAME``. Entries of live processes, of other machines and every other name are left alone. Returns what was removed or put
    back. A missing ``directory`` is fine."""
    directory = Path(directory)
    try:
        entries = sorted(directory.iterdir())
    except OSError:  # missing, not a directory, not readable: nothing of ours to clean
        return []
    done = []
    for entry in entries:
        m = TEMP_NAME.match(entry.name)
        if m is None or (m["host"] and m["host"] != HOST) or pid_alive(int(m["pid"])):
            continue
        target = directory / m["name"]
        try:  # best effort: what cannot be removed (another user's, a read-only share) stays
            if m["kind"] == "old" and not m["random"] and not target.exists() and not TEMP_NAME.match(m["name"]):
                os.replace(entry, target)  # the previous version, moved aside just before a kill: the only copy
            elif entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink(missing_ok=True)
        except OSError:
            continue
        done.append(entry)
    if done:
        with suppress(OSError):
            fsync_dir(directory)
    return done


def write_dir_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)`` then rename ``tmp_dir`` to ``path`` (replacing an older ``path``). On any failure the
    temp dir is removed and ``path`` is as it was. Creates ``path``'s parent. Returns ``path``."""
    path = Path(path)
    tmp = _sibling(path, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        fsync_tree(tmp)
        if path.exists():
            old = _sibling(path, "old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)  # put the previous one back
                raise
            fsync_dir(path.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
            fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def free_space(path: str | os.PathLike) -> str:
    """``"N MiB free on its disk"`` for the nearest existing ancestor of ``path`` ("" when it cannot be read): for
    the errors of writes that failed, so that a full disk is named as such."""
    here = Path(path)
    while not here.exists() and here != here.parent:
        here = here.parent
    try:
        return f"{shutil.disk_usage(here).free / 2**20:,.0f} MiB free on its disk"
    except OSError:
        return ""


def write_file_atomically(path: str | os.PathLike, data: str | bytes, encoding: str = "utf-8") -> Path:
    """Write ``data`` to a temp file beside ``path``, fsync it and rename it into place; on failure the temp file is
    removed and ``path`` is as it was. Returns ``path``."""
    path = Path(path)
    tmp = _sibling(path, "tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data if isinstance(data, bytes) else data.encode(encoding))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path

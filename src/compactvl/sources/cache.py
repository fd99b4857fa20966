"""Conversion cache: each built-in source is converted once into ``$COMPACTVL_CACHE/<name>/`` (default
``~/.cache/compactvl/<name>/``) and loaded from there afterwards.

A conversion writes into a fresh temporary directory ``.<name>.tmp-<pid>.<host>-<random>`` beside the target, fsyncs it and
moves it in place with ``os.replace`` (then fsyncs the cache root), so the target either does not exist or is
complete; concurrent converters race harmlessly (the first rename wins, the others discard their copy). A converter
that is killed cannot clean up: every ``cached`` call first removes the temp directories whose process is gone
(``compactvl.atomic.remove_stale``; other machines' folders in a shared cache and other names are never touched). A marker ``compactvl_cache.json`` records the conversion format version: bumping
``version`` in the caller re-converts stale caches.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import suppress
from pathlib import Path
from typing import Callable

from safetensors import SafetensorError

from ..atomic import free_space, fsync_dir, fsync_tree, owner_tag, remove_stale
from ..errors import CheckpointError, CompactVLError

MARKER = "compactvl_cache.json"


def cache_root() -> Path:
    return Path(os.environ.get("COMPACTVL_CACHE") or Path.home() / ".cache" / "compactvl")


def is_cached(name: str, version: int = 1) -> bool:
    try:
        return json.loads((cache_root() / name / MARKER).read_text()).get("version") == version
    except (OSError, json.JSONDecodeError):
        return False


def cached(name: str, build: Callable[[Path], None], version: int = 1, source: str = "") -> Path:
    """Path of the complete cache dir ``<root>/<name>``, calling ``build(tmp_dir)`` first when it is missing/stale."""
    root, target = cache_root(), cache_root() / name
    with suppress(OSError):  # a read-only shared cache: whoever can write it cleans it
        remove_stale(root)  # conversions killed half-way: their process is gone
    if is_cached(name, version):
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-{owner_tag()}-", dir=root))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    except OSError as e:
        raise CheckpointError(f"cannot write the compactvl cache at {root}: {e}; set COMPACTVL_CACHE to a "
                              "writable directory") from e
    try:
        try:
            build(tmp)
            (tmp / MARKER).write_text(json.dumps({"name": name, "version": version, "source": source}))
            fsync_tree(tmp)
        except CompactVLError:
            raise  # the converter's own error already says what to do
        except (OSError, SafetensorError) as e:  # a full disk; safetensors reports it as its own error
            raise CheckpointError(f"could not convert {name} into the compactvl cache at {root}: {e} "
                                  f"({free_space(root)}); free disk space or set COMPACTVL_CACHE to a directory "
                                  "with room") from e
        if target.exists():  # stale version (or a racing writer finished first)
            if is_cached(name, version):
                return target
            trash = Path(tempfile.mkdtemp(prefix=f".{name}.old-{owner_tag()}-", dir=root))
            os.replace(target, trash / name)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.replace(tmp, target)
            fsync_dir(root)
        except OSError:
            if not is_cached(name, version):
                raise
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

"""Conversion cache: each built-in source is converted once into ``$COMPACTVL_CACHE/<name>/`` (default
``~/.cache/compactvl/<name>/``) and loaded from there afterwards.

A conversion writes into a fresh temporary directory beside the target and is moved in place with ``os.replace``,
so the target either does not exist or is complete; concurrent converters race harmlessly (the first rename wins,
the others discard their copy). A marker ``compactvl_cache.json`` records the conversion format version: bumping
``version`` in the caller re-converts stale caches.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ..errors import CheckpointError

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
    if is_cached(name, version):
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    except OSError as e:
        raise CheckpointError(f"cannot write the compactvl cache at {root}: {e}; set COMPACTVL_CACHE to a "
                              "writable directory") from e
    try:
        build(tmp)
        (tmp / MARKER).write_text(json.dumps({"name": name, "version": version, "source": source}))
        if target.exists():  # stale version (or a racing writer finished first)
            if is_cached(name, version):
                return target
            trash = Path(tempfile.mkdtemp(prefix=f".{name}.old.", dir=root))
            os.replace(target, trash / name)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not is_cached(name, version):
                raise
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

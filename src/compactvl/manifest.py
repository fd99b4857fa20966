"""Manifests: ``manifest.json`` lists every file of a saved model or training checkpoint with its size and SHA-256.

Writers call ``write_manifest(tmp_dir)`` last, inside the atomic temp directory (``compactvl.atomic``), so a directory
that has a manifest was written completely. Readers call ``verify_manifest(dir, full=...)`` before reading anything:
every listed file must exist with its size (always checked; it catches deleted, truncated, extended and replaced
files) and, with ``full`` or for files under ``HASH_ALWAYS_BELOW`` bytes (configs, tokenizers: cheap), its SHA-256
(it catches flipped bytes). The manifest checks itself too: it holds a SHA-256 of its own ``files`` table and must be
byte-identical to its canonical JSON, so a damaged manifest is named as such rather than blamed on a file it lists.
Every failure is a :class:`~compactvl.errors.CheckpointError` that names the damaged file and what to do.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from .errors import CheckpointError

MANIFEST = "manifest.json"
FORMAT = 1
HASH_ALWAYS_BELOW = 16 * 2**20  # files smaller than this are hashed even by the fast check


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _table_hash(files: dict) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _dump(doc: dict) -> bytes:
    return (json.dumps(doc, sort_keys=True, indent=1) + "\n").encode()


def write_manifest(directory: str | os.PathLike) -> Path:
    """Write ``directory/manifest.json`` listing every file below ``directory`` (relative POSIX paths) with its
    size and SHA-256. Call it last, after every other file is written. Returns its path."""
    directory = Path(directory)
    files = {}
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if p.is_file() and rel != MANIFEST:
            files[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    path = directory / MANIFEST
    path.write_bytes(_dump({"format": FORMAT, "files": files, "sha256": _table_hash(files)}))
    return path


def _valid_table(files: object) -> bool:
    return isinstance(files, dict) and all(
        isinstance(k, str) and k and not k.startswith("/") and ".." not in k.split("/") and isinstance(v, dict)
        and set(v) == {"bytes", "sha256"} and isinstance(v["bytes"], int) and isinstance(v["sha256"], str)
        for k, v in files.items())


def read_manifest(directory: str | os.PathLike, todo: str) -> dict[str, dict]:
    """The ``files`` table of ``directory/manifest.json`` after checking the manifest itself (``todo``: what the
    error message tells the user to do)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path} is missing, so {Path(directory)} cannot be checked: it is incomplete or was "
                              f"written before compactvl wrote manifests; {todo} (files you trust can be given one "
                              "with compactvl.manifest.write_manifest)")
    raw = path.read_bytes()
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path} is damaged (not valid JSON: {e}); {todo}") from None
    if isinstance(doc, dict) and isinstance(doc.get("format"), int) and doc["format"] > FORMAT:
        raise CheckpointError(f"{path} has manifest format {doc['format']}, newer than this compactvl reads "
                              f"({FORMAT}); upgrade compactvl")
    if not (isinstance(doc, dict) and set(doc) == {"format", "files", "sha256"} and doc["format"] == FORMAT
            and _valid_table(doc["files"]) and doc["sha256"] == _table_hash(doc["files"]) and raw == _dump(doc)):
        raise CheckpointError(f"{path} is damaged (its contents do not match its own checksum); {todo}")
    return doc["files"]


def verify_manifest(directory: str | os.PathLike, full: bool, todo: str, must_list: Iterable[str] = ()) -> None:
    """Check ``directory`` against its manifest: every listed file present with its size, and its SHA-256 when
    ``full`` or when it is under ``HASH_ALWAYS_BELOW`` bytes. ``must_list``: names that, when present, must be in the
    manifest (files a loader would read). Raises CheckpointError naming the first damaged file and ``todo``."""
    directory = Path(directory)
    files = read_manifest(directory, todo)
    for name in must_list:
        if name not in files and (directory / name).exists():
            raise CheckpointError(f"{directory / name} is not in {MANIFEST}: it was added after the directory was "
                                  f"written; remove it, or {todo}")
    for name, entry in files.items():
        verify_file(directory / name, entry, todo, MANIFEST, hash_it=full or entry["bytes"] < HASH_ALWAYS_BELOW)


def verify_file(f: Path, entry: dict, todo: str, where: str, hash_it: bool = True) -> None:
    """``f`` exists with the recorded ``entry["bytes"]`` and (``hash_it``) ``entry["sha256"]``; else a CheckpointError
    naming ``f``, the record that lists it (``where``) and ``todo``."""
    if not f.is_file():
        raise CheckpointError(f"{f} is missing (it is listed in {where}); {todo}")
    size = f.stat().st_size
    if size != entry["bytes"]:
        raise CheckpointError(f"{f} is damaged: {size} bytes, {where} says {entry['bytes']} (truncated, extended or "
                              f"replaced); {todo}")
    if hash_it and sha256_file(f) != entry["sha256"]:
        raise CheckpointError(f"{f} is damaged: its SHA-256 differs from the one in {where} (changed bytes); {todo}")

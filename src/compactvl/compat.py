"""The library versions compactvl supports, checked once at import without importing them.

``SUPPORTED_TRANSFORMERS`` is the range ``pyproject.toml`` declares; both ends are tested: the lower end by
``./run test-oldest`` and the upper by the lock (``requirements/lock.txt``) and ``./run test-latest``. An installed
transformers outside it (a GPU image's own release, an install with ``--no-deps``) gets one warning naming the range.
"""
from __future__ import annotations

import re
import warnings
from importlib import metadata

from .errors import CompactVLWarning

SUPPORTED_TRANSFORMERS = ("5.17.0", "6")  # [lowest tested, first unsupported major)


def _release(version: str) -> tuple[int, ...]:
    """(5, 24, 0) from '5.24.0', '5.24.0.dev0' or '5.24.0rc1'; pre-releases count as their release."""
    parts = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(p) for p in parts.group(0).split(".")) if parts else ()


def transformers_version() -> str | None:
    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return None


def in_range(version: str, lo: str = SUPPORTED_TRANSFORMERS[0], hi: str = SUPPORTED_TRANSFORMERS[1]) -> bool:
    v = _release(version)
    return _release(lo) <= v < _release(hi)


def check_transformers(version: str | None = None) -> str | None:
    """Warn (once per call site, as warnings do) when the installed transformers is outside the supported range;
    returns the message, or None when the version is supported or transformers is not installed."""
    version = transformers_version() if version is None else version
    if version is None or in_range(version):
        return None
    lo, hi = SUPPORTED_TRANSFORMERS
    msg = (f"compactvl supports transformers >={lo},<{hi} but {version} is installed; the Runner may fail or "
           f"generate wrong tokens. Install the locked versions with ./run setup, or pip install "
           f"'transformers>={lo},<{hi}'")
    warnings.warn(msg, CompactVLWarning, stacklevel=3)
    return msg

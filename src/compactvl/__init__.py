"""compactvl: build, train, compress and benchmark VLMs that see through few, information-dense visual tokens.

Entry points (imported lazily so ``import compactvl`` and the CLI start fast):
- ``compactvl.CompactVLM``: the VLM (``compactvl.model``).
- ``compactvl.compress(model, method=..., **knobs)`` / ``compactvl.load_compressed(path, method=...)``: training-free
  compression of an existing transformers VLM (``compactvl.compression``).
"""
from __future__ import annotations

__version__ = "0.1.0"
from .compat import check_transformers

check_transformers()  # one warning naming the supported range when the installed transformers is outside it
_LAZY = {"CompactVLM": "model", "compress": "compression", "load_compressed": "compression", "Runner": "runner"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib  # lazy attributes: `import compactvl` stays light

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'compactvl' has no attribute {name!r}")

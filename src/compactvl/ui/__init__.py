"""``compactvl ui``: a web page that answers a question about an image with a saved model, as saved and with a
compression method at a budget, side by side, with the visual tokens drawn over the image (docs/ui.md).

    from compactvl.ui import Session, launch
    launch(Session(model), title="demo", port=7860)

Modules: ``overlay`` (pure drawing: image + provenance -> image), ``session`` (the checks and runs, no web
framework), ``app`` (the Gradio page; needs the ``ui`` extra: ``pip install 'compactvl[ui]'``).
"""
from __future__ import annotations

import importlib

# Names resolve on first use, so ``compactvl.ui.overlay`` / ``session`` import without gradio.
_WHERE = {"Session": "session", "respond": "session", "draw_tokens": "overlay", "build_app": "app", "launch": "app"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

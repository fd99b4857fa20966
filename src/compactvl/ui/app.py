"""The Gradio page of ``compactvl ui`` (docs/ui.md): inputs on the left, the comparison on the right.

    from compactvl.ui import Session, build_app
    app = build_app(Session(model), title="demo")
    app.launch(server_name="127.0.0.1", server_port=7860)

Gradio is imported inside :func:`build_app` (it is the ``ui`` extra, and importing it takes seconds), so the rest of
compactvl, ``compactvl --help`` included, neither needs nor waits for it.
"""
from __future__ import annotations

import functools
import os
from typing import Any

from ..errors import ConfigError
from .session import Session, respond

UPLOAD_TYPES = [".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"]


def import_gradio() -> Any:
    """gradio, or a ConfigError saying how to install it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home (closed networks hang on them)
    try:
        import gradio  # the ui extra, imported on demand: see the module docstring
    except ModuleNotFoundError as e:
        if e.name != "gradio":
            raise
        raise ConfigError("compactvl ui needs gradio: pip install 'compactvl[ui]'") from e
    return gradio


def build_app(session: Session, title: str = "compactvl") -> Any:
    """The ``gradio.Blocks`` page for ``session``."""
    gr = import_gradio()
    default = next((m for m in ("visionzip", "divprune", "fastv") if m in session.methods), session.methods[0]
                   if session.methods else None)
    with gr.Blocks(title=f"compactvl ui — {title}", analytics_enabled=False) as app:
        gr.Markdown(f"## compactvl ui — {title}\nAsk a question about an image and compare a token-compression "
                    f"method with the model as saved ({session.visual_per_image} visual tokens per image). The "
                    "overlays show which image patches the visual tokens entering the LM come from: darkened patches "
                    "are pruned, coloured groups are merged into one token, white lines outline each token.")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.File(label="image", file_types=UPLOAD_TYPES, type="filepath", elem_id="image")
                question = gr.Textbox(label="question", placeholder="What color is the circle?", elem_id="question")
                method = gr.Dropdown(session.methods, value=default, label="method", elem_id="method")
                budget = gr.Slider(1, 100, value=25, step=1, label="budget: % of visual tokens kept",
                                   elem_id="budget")
                run = gr.Button("Run", variant="primary", elem_id="run")
            with gr.Column(scale=2):
                status = gr.Markdown("Upload an image, type a question, pick a method and press Run.",
                                     elem_id="status")
                table = gr.Markdown(elem_id="table")
                with gr.Row():
                    base = gr.Image(label="as saved: tokens entering the LM", type="pil", elem_id="overlay-baseline",
                                    interactive=False, height=380)
                    over = gr.Image(label="method: tokens entering the LM", type="pil", elem_id="overlay",
                                    interactive=False, height=380)
                layers = gr.Image(label="in-LLM pruning: the method's tokens alive at each pruning layer",
                                  type="pil", interactive=False, elem_id="layers")
        run.click(functools.partial(respond, session), [image, question, method, budget],
                  [status, table, base, over, layers], concurrency_limit=1)
    return app


def launch(session: Session, title: str, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> Any:
    """Serve the page on ``host:port`` (``block=False``: in the background; ``app.close()`` stops it)."""
    app = build_app(session, title)
    app.queue(max_size=16)
    app.launch(server_name=host, server_port=port, max_file_size=session.max_image_bytes, prevent_thread_lock=not block,
               show_error=True, quiet=not block)
    return app

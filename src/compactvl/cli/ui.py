"""``compactvl ui``: a web page comparing a compression method with the model as saved (docs/ui.md)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError
from .serve import add_server_arguments


def add_parser(sub) -> None:
    p = sub.add_parser(
        "ui",
        help="a web page: ask about an image, compare a compression method with the uncompressed model",
        description="Serve a Gradio page for a saved compactvl model: upload an image, ask a question, pick a "
        "compression method and a budget; see both answers, the visual tokens kept or merged drawn over the image "
        "(per pruning layer for in-LLM methods), token counts, LLM MACs and latency. Needs the ui extra: "
        "pip install 'compactvl[ui]'. See docs/ui.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  compactvl ui reference                    (the committed reference model; http://127.0.0.1:7860)\n"
               "  compactvl ui runs/demo --port 8080 --max-new-tokens 16",
    )
    add_server_arguments(p, port=7860)
    p.add_argument("--max-new-tokens", type=int, default=32, help="answer length limit (default 32)")
    p.add_argument("--max-image-bytes", type=int, default=8_000_000, help="one upload's size limit (default 8 MB)")
    p.add_argument("--max-image-pixels", type=int, default=None, help="one image's pixels, from its header, before "
                   "decoding (default: the model's max_pixels)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..ui.app import import_gradio, launch  # on demand: --help stays fast
    from ..reference import resolve  # (the same)
    from ..ui.session import Session  # (the same: torch)
    from ..variants import load_model  # (the same)

    import_gradio()  # a missing extra is said before the model is read
    for name in ("max_new_tokens", "max_image_bytes"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    title = args.model if args.model == "reference" else Path(args.model).resolve().name
    model = load_model(resolve(args.model), args.device)  # "reference": the committed model, rebuilt once
    session = Session(model, max_new_tokens=args.max_new_tokens, max_image_bytes=args.max_image_bytes,
                      max_image_pixels=args.max_image_pixels)
    print(f"compactvl ui: {title} on http://{args.host}:{args.port} ({len(session.methods)} methods)", flush=True)
    launch(session, title, host=args.host, port=args.port)
    return 0

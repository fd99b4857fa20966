"""``compactvl serve``: a saved model behind an OpenAI-compatible HTTP API (docs/serving.md)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a saved model over an OpenAI-compatible HTTP API",
        description="Serve a saved compactvl model on /v1/chat/completions (JSON or streamed) and /v1/models, with "
        "dynamic batching of concurrent requests. Images come as base64 data URLs (local paths only inside "
        "--allow-local-images). Needs the serve extra: pip install 'compactvl[serve]'. See docs/serving.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  compactvl serve reference --port 8000      (the committed reference model)\n"
               "  compactvl serve runs/demo --port 8000\n"
               "  compactvl serve runs/demo --allow-method fastv --allow-method visionzip --max-batch 16\n"
               "  compactvl serve runs/demo --allow-local-images /data/images --name demo",
    )
    add_server_arguments(p, port=8000)
    p.add_argument("--name", default=None, help="the model id clients name (default: the model folder's name)")
    p.add_argument("--allow-method", action="append", default=[], metavar="NAME",
                   help="a compression method requests may ask for in 'compression' (repeat; default: none)")
    p.add_argument("--allow-local-images", default=None, metavar="FOLDER",
                   help="accept image paths (file:///... or /...) inside FOLDER; others get 403")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="wait for more requests after the first of a "
                   "batch (default 5)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests; more get 429 (default 64)")
    p.add_argument("--max-request-bytes", type=int, default=20_000_000, help="request body limit (413 above)")
    p.add_argument("--max-image-bytes", type=int, default=8_000_000, help="one image's encoded size limit (413 above)")
    p.add_argument("--max-image-pixels", type=int, default=16_000_000, help="one image's pixels, from its header, "
                   "before decoding (400 above)")
    p.add_argument("--max-images", type=int, default=4, help="images in one request (400 above)")
    p.add_argument("--max-tokens-limit", type=int, default=512, help="the largest max_tokens allowed (400 above)")
    p.add_argument("--default-max-tokens", type=int, default=64, help="max_tokens when a request gives none")
    p.add_argument("--graceful-timeout", type=float, default=60.0, help="seconds to finish in-flight requests on "
                   "shutdown (default 60)")
    p.set_defaults(func=run)


def add_server_arguments(p: argparse.ArgumentParser, port: int) -> None:
    """MODEL, --host, --port and --device: what `compactvl serve` and `compactvl ui` both take."""
    p.add_argument("model", help="a directory written by save_pretrained, a `compactvl train` / `demo` run, or "
                   "'reference' (the committed reference model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=port)
    p.add_argument("--device", default=None, help="e.g. cuda (default: where from_pretrained puts it, the CPU)")


def run(args: argparse.Namespace) -> int:
    try:
        from ..serve import ServeSettings, load_model, serve  # optional dependency (the serve extra)
    except ModuleNotFoundError as e:
        if e.name not in ("fastapi", "uvicorn", "starlette"):
            raise
        raise ConfigError(f"compactvl serve needs {e.name}: pip install 'compactvl[serve]'") from e
    from ..reference import resolve  # on demand: --help stays fast
    from ..registry import POLICIES, TOKEN_OPS  # (the same)

    for name in args.allow_method:
        if name not in TOKEN_OPS and name not in POLICIES:
            raise ConfigError(f"--allow-method {name}: not a token op ({', '.join(sorted(TOKEN_OPS.names()))}) nor a "
                              f"layer policy ({', '.join(POLICIES.names())})")
    name = args.name or (args.model if args.model == "reference" else Path(args.model).resolve().name)
    args.model = resolve(args.model)  # the name "reference": the committed reference model, rebuilt once
    settings = ServeSettings(
        model_name=name, max_request_bytes=args.max_request_bytes,
        max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels, max_images=args.max_images,
        max_tokens_limit=args.max_tokens_limit, default_max_tokens=args.default_max_tokens, max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue,
        local_image_dir=Path(args.allow_local_images) if args.allow_local_images else None,
        allowed_methods=tuple(args.allow_method),
    )
    model = load_model(args.model, args.device)
    serve(model, settings, host=args.host, port=args.port, graceful_timeout=args.graceful_timeout)
    return 0

"""The ``compactvl`` command. Each sub-command lives in ``compactvl/cli/<name>.py`` and exposes
``add_parser(subparsers)`` which registers itself and sets ``func`` (args -> exit code)."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from typing import Iterator

from ..errors import CompactVLError

SUBCOMMANDS = ["demo", "chat", "train", "eval", "data", "macs", "bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compactvl",
        description="Build, train, compress and benchmark VLMs that see through few visual tokens.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"compactvl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            mod = importlib.import_module(f"compactvl.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"compactvl.cli.{name}":
                continue
            raise
        mod.add_parser(sub)
    return parser


@contextlib.contextmanager
def library_progress_bars(enabled: bool) -> Iterator[None]:
    """With ``enabled=False`` (--no-progress): transformers' weight-loading bars and the hub's download bars are off
    too, not only compactvl's; the previous setting comes back afterwards (main() may run in-process)."""
    if enabled:
        yield
        return
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    hf_before, hub_before = hf_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    hub_utils.disable_progress_bars()
    try:
        yield
    finally:
        if hf_before:
            hf_logging.enable_progress_bar()
        if not hub_before:
            hub_utils.enable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # sub-commands that take recipe overrides (--section.key VALUE) set overrides_allowed
        if not getattr(args, "overrides_allowed", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = extra
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with library_progress_bars(enabled=not getattr(args, "no_progress", False)):
            return int(args.func(args) or 0)
    except CompactVLError as e:
        print(f"compactvl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: training has already written its checkpoint and said how to resume
        print(f"\ncompactvl {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `compactvl macs ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())

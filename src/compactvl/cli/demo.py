"""``compactvl demo``: train a VLM from real pretrained parts (SmolLM2-135M-Instruct + DINOv2-S) on synthvqa and
easy-vqa, evaluate it on their held-out test splits as trained and with fewer visual tokens, and write a table,
results.json and accuracy.png (chance levels stated). ``--quick`` runs the same code with tiny random parts.

    compactvl demo [--quick] [--out DIR] [--recipe demo] [--section.key VALUE ...]
    compactvl demo --compare venvl,leomini,llava_stf [--quick] [--out DIR] [--section.key VALUE ...]

``--compare`` trains and evaluates each named recipe in turn, from the same pretrained parts, with the same overrides
applied to all of them, and writes a comparison (compare.json, compare.png) beside the per-recipe runs.
"""
from __future__ import annotations

import argparse

from ..errors import ConfigError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="train + evaluate a small VLM on a CPU (the README's main command)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              allow_abbrev=False)
    p.add_argument("--quick", action="store_true", help="tiny random parts: checks the code path in seconds")
    p.add_argument("--out", default=None, help="output directory (default: the recipe's output_dir, runs/demo)")
    p.add_argument("--recipe", default=None, help="another recipe instead of the packaged `demo`")
    p.add_argument("--compare", default=None, metavar="R1,R2,...",
                   help="train + evaluate these recipes one after the other and compare them (overrides apply to "
                        "every recipe; default output runs/compare)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run, overrides_allowed=True)


def run(args: argparse.Namespace) -> int:
    from ..demo import compare_recipes, main_args  # lazy: the demo imports torch, the model and training (seconds)

    if args.compare is not None:
        if args.recipe is not None:
            raise ConfigError("--compare names the recipes itself; drop --recipe")
        names = [r.strip() for r in args.compare.split(",") if r.strip()]
        compare_recipes(names, args.out, args.quick, getattr(args, "overrides", []), progress=not args.no_progress)
        return 0
    main_args(args.quick, args.out, getattr(args, "overrides", []), args.recipe, progress=not args.no_progress)
    return 0

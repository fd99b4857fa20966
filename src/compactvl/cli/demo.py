"""``compactvl demo``: train a VLM from real pretrained parts (SmolLM2-135M-Instruct + DINOv2-S) on synthvqa and
easy-vqa, evaluate it on their held-out test splits as trained and with fewer visual tokens, and write a table,
results.json and accuracy.png (chance levels stated). ``--quick`` runs the same code with tiny random parts.

    compactvl demo [--quick] [--out DIR] [--recipe demo] [--section.key VALUE ...]
    compactvl demo --compare systems [--budget 16] [--only venvl,qmop] [--check | --report] [--quick] [--out DIR]
    compactvl demo --compare venvl,leomini,llava_stf [--unequal] [--quick] [--out DIR] [--section.key VALUE ...]

``--compare`` trains and evaluates systems one after the other and compares them on the same items with paired 95 %
intervals, with the baseline and with a question-only control (each test question's most common training answer,
no image looked at): a packaged suite (``systems``: the seed systems against pixel-shuffle, avgpool and resampler
baselines at 16 and 4 visual tokens, the same data and steps for all) or recipes named with commas (the first is the
baseline). Every system's visual tokens, data and steps are checked before anything trains; unequal ones are refused.
Each system runs in OUT/<budget>/<system>; a finished one is reused and an interrupted one resumes, so the same
command continues where it stopped. compare.json, compare.md, compare.png and curves.png go into OUT (default
runs/compare-<suite>). On CUDA a suite uses its larger `cuda` budget.
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
    p.add_argument("--compare", default=None, metavar="SUITE|R1,R2,...",
                   help="train + evaluate the systems of a suite (packaged: systems) or these recipes one after the "
                        "other and compare them with the first / the baseline (overrides apply to every system)")
    p.add_argument("--budget", action="append", default=[], metavar="TOKENS",
                   help="with a suite: only this budget of visual tokens (repeatable; default: all)")
    p.add_argument("--only", default=None, metavar="S1,S2", help="with --compare: only these systems (and the baseline)")
    p.add_argument("--check", action="store_true",
                   help="with --compare: build every system and check its budget, then stop (nothing trains)")
    p.add_argument("--unequal", action="store_true",
                   help="with named recipes: compare them even if their visual tokens or training data differ")
    p.add_argument("--report", action="store_true",
                   help="with --compare: only rewrite compare.json / .md / .png from the systems finished so far")
    p.add_argument("--fresh", action="store_true",
                   help="with --compare: retrain every system instead of reusing or resuming earlier runs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run, overrides_allowed=True)


def run(args: argparse.Namespace) -> int:
    if args.compare is not None:
        from ..compare import run_comparison  # lazy: imports torch, the model and training (seconds)

        if args.recipe is not None:
            raise ConfigError("--compare names the recipes itself; drop --recipe")
        only = [r.strip() for r in (args.only or "").split(",") if r.strip()]
        run_comparison(args.compare, args.out, args.quick, getattr(args, "overrides", []), budgets=args.budget,
                       only=only, check=args.check, unequal=args.unequal, fresh=args.fresh, report=args.report,
                       progress=not args.no_progress)
        return 0
    used = [f for f in ("budget", "only", "check", "unequal", "fresh", "report") if getattr(args, f)]
    if used:
        raise ConfigError(f"--{used[0]} goes with --compare")
    from ..demo import main_args  # lazy: the demo imports torch, the model and training (seconds)

    main_args(args.quick, args.out, getattr(args, "overrides", []), args.recipe, progress=not args.no_progress)
    return 0

"""``compactvl study MODEL``: training-free methods x budgets x evaluation sets on one model, each cell compared
with the model uncompressed on the same items (compactvl.study).

    compactvl study runs/demo --set synthvqa --n 500 --out runs/study
    compactvl study runs/demo --set synthvqa --set easyvqa --methods fastv,random,visionzip --budgets 0.5,0.25
    compactvl study path/to/llava-hf --set synthvqa --n 200 --budgets 0.25

MODEL is a saved compactvl model or run directory, a transformers VLM directory, or `reference` (the default: the
committed reference model, compactvl.reference). A killed study continues where
it stopped when run again with the same --out (its cells are cached); other settings into the same --out are
refused. Writes study.json, study.md, retention_vs_speedup.png and category_retention.png.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("study", help="methods x budgets x eval sets on one model, with intervals",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default="reference",
                   help="a compactvl model or run directory, a transformers VLM directory, or 'reference' (the "
                   "committed reference model; the default)")
    p.add_argument("--set", dest="sets", action="append", default=[],
                   help="evaluation set (repeat): synthvqa, easyvqa or a LLaVA .json file (default synthvqa)")
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=int, default=500, help="items per set (default 500; fewer when the set is smaller)")
    p.add_argument("--distractors", type=int, default=None, help="synthvqa: other objects per scene (default: as "
                   "the compactvl model trained on synthvqa, else the set's full clutter)")
    p.add_argument("--methods", default=None, help="comma-separated method names (default: every training-free "
                   "method of the registries that this model can run)")
    p.add_argument("--budgets", default="0.5,0.25,0.125,0.0625",
                   help="fractions of the visual tokens kept (default 0.5,0.25,0.125,0.0625)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    p.add_argument("--out", default="runs/study", help="output directory (default runs/study)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch  # on demand: --help stays fast

    from ..study import StudySettings, load_study_model, run_study  # on demand: --help stays fast

    try:
        budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    except ValueError:
        raise ConfigError(f"--budgets {args.budgets!r}: give fractions separated by commas, e.g. 0.5,0.25") from None
    if not budgets or any(not 0 < b <= 1 for b in budgets):
        raise ConfigError(f"--budgets {args.budgets!r}: every budget is a fraction in (0, 1]")
    from ..reference import resolve  # (the same)

    args.model = resolve(args.model)  # the name "reference": the committed reference model, rebuilt once
    distractors = args.distractors if args.distractors is not None else trained_distractors(args.model)
    sets = [{"name": s, "split": args.split, "n": args.n,
             **({"distractors": distractors} if s == "synthvqa" and distractors is not None else {})}
            for s in (args.sets or ["synthvqa"])]
    device = args.device or ("cuda" if torch.cuda.is_available() else None)
    model = load_study_model(args.model, device=device)
    settings = StudySettings(sets=sets, budgets=budgets, batch_size=args.batch_size,
                             max_new_tokens=args.max_new_tokens,
                             methods=[m.strip() for m in args.methods.split(",")] if args.methods else None)
    report = run_study(model, settings, args.out, progress=not args.no_progress)
    ok = sum(c["status"] == "ok" for c in report["cells"])
    print(f"{ok} of {len(report['cells'])} cells ran; wrote {args.out}/study.json, study.md and the charts")
    return 0


def trained_distractors(path: str) -> int | list | None:
    """The synthvqa ``distractors`` a compactvl model trained with (its run's config.yaml), said aloud; None when
    it is no compactvl model or did not train on synthvqa with them set."""
    from ..config import CONFIG_FILE, read_yaml  # on demand: --help stays fast
    from ..model import find_model_dir  # (the same)

    model_dir = find_model_dir(path)
    if model_dir is None:
        return None
    recipe = next((p for p in (model_dir / CONFIG_FILE, Path(path) / CONFIG_FILE) if p.is_file()), None)
    specs = (read_yaml(recipe).get("data") or {}).get("train") or [] if recipe else []
    found = next((d.get("distractors") for d in specs if isinstance(d, dict) and d.get("name") == "synthvqa"), None)
    if found is not None:
        print(f"synthvqa as the model trained on it: distractors={found} (--distractors changes this)")
    return found

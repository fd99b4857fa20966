"""``compactvl data``: export a dataset as LLaVA JSON + PNGs, check a LLaVA file, or list a built-in set's
categories, answer spaces and chance levels.

    compactvl data export --set synthvqa --split test --n 100 --out DIR
    compactvl data export --set synthvqa --split test --n 100 --format lmms --out DIR   (an lmms-eval task folder)
    compactvl data check data.json --image-folder images/ [--skip-malformed] [--lm smollm2-135m]
    compactvl data info --set synthvqa
"""
from __future__ import annotations

import argparse
import functools
from collections import Counter

from ..errors import ConfigError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="export, check or describe datasets",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    raw = argparse.RawDescriptionHelpFormatter
    e = sub.add_parser("export", help="write a dataset as LLaVA JSON + PNG files", formatter_class=raw, epilog=(
        "examples:\n  compactvl data export --set synthvqa --split test --n 100 --out data/synth\n"
        "  compactvl data export --set synthvqa --split test --n 100 --distractors 0 --out data/clean  "
        "(the demo's scenes)"))
    e.add_argument("--set", required=True, dest="dataset",
                   help="synthvqa, easyvqa, or the path of a LLaVA .json/.jsonl file")
    e.add_argument("--split", default="test", help="train / val / test (easy-vqa: train / test)")
    e.add_argument("--n", type=int, default=None, help="number of samples (default: the whole split)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--difficulty", nargs="+", default=None, help="synthvqa object sizes: small medium large")
    e.add_argument("--distractors", nargs="+", type=int, default=None, metavar="N",
                   help="synthvqa: other objects per scene, N or LO HI (default: each category's own range)")
    e.add_argument("--out", required=True, help="output directory (created if missing)")
    e.add_argument("--name", default=None, help="JSON file name without .json (default: SET_SPLIT)")
    e.add_argument("--image-folder", default=None, help="for a LLaVA file: the folder its image paths are under")
    e.add_argument("--skip-malformed", action="store_true", help="for a LLaVA file: skip and count bad records")
    e.add_argument("--format", default="llava", choices=["llava", "lmms"],
                   help="llava: LLaVA JSON + PNGs (default); lmms: parquet + lmms-eval task YAMLs for "
                        "`lmms-eval --include_path OUT` (docs/lmms-eval.md)")
    e.add_argument("--task", default=None, help="with --format lmms: the task name (default: compactvl_SET)")
    e.set_defaults(func=_export)

    c = sub.add_parser("check", help="validate a LLaVA .json/.jsonl file and its images", formatter_class=raw,
                       epilog="examples:\n  compactvl data check data/synth/synthvqa_test.json\n"
                              "  compactvl data check my.jsonl --image-folder images/ --skip-malformed")
    c.add_argument("file")
    c.add_argument("--image-folder", default=None, help="folder the image paths are under (default: the file's)")
    c.add_argument("--skip-malformed", action="store_true", help="report every bad record instead of the first")
    c.add_argument("--lm", default=None, help="also tokenise every record with this language model's tokenizer and "
                                              "chat template and check it fits its context (a known name or a local "
                                              "directory)")
    c.add_argument("--visual-tokens", type=int, default=0, metavar="N",
                   help="with --lm: visual tokens each image adds to the length (default 0: text only)")
    c.set_defaults(func=_check)

    i = sub.add_parser("info", help="categories, answer spaces and chance levels of a built-in set",
                       formatter_class=raw, epilog="examples:\n  compactvl data info --set synthvqa")
    i.add_argument("--set", required=True, dest="dataset", choices=["synthvqa", "easyvqa"])
    i.set_defaults(func=_info)


def _export(args: argparse.Namespace) -> int:
    from ..data import LlavaDataset, get_dataset, write_llava  # on demand: --help stays fast

    ds = get_dataset(args.dataset, args.split, n=args.n, seed=args.seed, image_folder=args.image_folder,
                     skip_malformed=args.skip_malformed, difficulty=args.difficulty,
                     distractors=args.distractors)
    name = args.name or (f"{args.dataset}_{args.split}" if args.dataset in ("synthvqa", "easyvqa") else "data")
    if args.format == "lmms":
        from ..lmms.export import export_task  # on demand: needs Hugging Face datasets

        x = export_task(ds, args.out, name, args.task, progress=True)
        print(f"wrote {x.records} records to {x.data} and the lmms-eval tasks {', '.join(x.tasks)}; run e.g.\n  "
              f"lmms-eval --model compactvl --model_args pretrained=reference --tasks {x.tasks[0]} "
              f"--include_path {args.out}")
        return 0
    elif args.task:
        raise ConfigError("--task names an lmms-eval task; it goes with --format lmms")
    w = write_llava(ds, args.out, name, progress=True)  # datasets iterate via __getitem__ until IndexError
    print(f"wrote {w.records} records and {w.images} images to {w.json_path}")
    if isinstance(ds, LlavaDataset) and ds.skipped:
        print(ds.report())
    return 0


def _check(args: argparse.Namespace) -> int:
    from ..data import LlavaDataset  # on demand: --help stays fast

    validator = None
    if args.lm is not None:
        from ..processor import Processor  # (the same)
        from ..sources import load_lm  # (the same)

        lm, tokenizer = load_lm(args.lm)
        validator = functools.partial(Processor(tokenizer).check_conversation,
                                      max_length=getattr(lm.config, "max_position_embeddings", None),
                                      visual_tokens_per_image=args.visual_tokens)
        del lm
    ds = LlavaDataset(args.file, args.image_folder, skip_malformed=args.skip_malformed, check_images=True,
                      validator=validator)
    cats = Counter(s.category for s in ds.samples if s.category)
    print(ds.report())
    if cats:
        print("categories: " + ", ".join(f"{c} {k}" for c, k in sorted(cats.items())))
    return 1 if ds.skipped else 0


def _info(args: argparse.Namespace) -> int:
    from ..data import EasyVQA, SynthVQA  # on demand: --help stays fast

    cls = {"synthvqa": SynthVQA, "easyvqa": EasyVQA}[args.dataset]
    for cat in cls.categories:
        space = cls.answer_space(cat)
        print(f"{cat:9s} chance {cls.chance_level(cat):.3f}  answers ({len(space)}): {' '.join(space)}")
    return 0

"""``compactvl eval MODEL [options] [--section.key VALUE ...]``: score a saved model on VQA sets.

    compactvl eval runs/demo                       # a training run: its model/ and its recipe's data.eval
    compactvl eval runs/demo/model --set easyvqa --split test --n 500 --batch-size 32
    compactvl eval runs/demo --eval.variants '[{name: avgpool-4, token_ops: [{op: avgpool, k: 8}]}]'
    compactvl eval path/to/llava-hf-model --set synthvqa --n 200 --method visionzip --knob keep=64
                                                   # a transformers VLM (directory or hub id), compressed

Writes, per dataset (and variant), predictions.jsonl, metrics.json and the resolved config.yaml under --out
(default: MODEL_RUN/eval), and prints accuracy per category with the chance level.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a saved model on VQA sets", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("model", help="a model directory (save_pretrained) or a training run directory holding model/")
    p.add_argument("--set", dest="dataset", default=None,
                   help="synthvqa, easyvqa or a LLaVA .json file (default: the run's data.eval)")
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=int, default=None, help="samples (default: the whole split)")
    p.add_argument("--image-folder", default=None, help="for a LLaVA file: the folder its image paths are under")
    p.add_argument("--skip-malformed", action="store_true", help="for a LLaVA file: skip and count bad records")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--out", default=None, help="output directory (default: RUN/eval or MODEL/../eval)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--method", default=None, help="for a transformers VLM: the compression method (a token op or "
                   "layer policy name, e.g. visionzip, fastv); default none")
    p.add_argument("--knob", action="append", default=[], metavar="NAME=VALUE",
                   help="for a transformers VLM: a knob of --method (repeat), e.g. --knob keep=64")
    p.set_defaults(func=run, overrides_allowed=True)


def run_transformers_vlm(args: argparse.Namespace) -> int:
    """Evaluate a transformers VLM (LLaVA, Qwen-VL, ...) compressed with --method through compactvl's adapters."""
    import yaml

    from ..compression import load_compressed
    from ..data import get_dataset
    from ..errors import ConfigError
    from ..evaluate import evaluate, format_table

    if not args.dataset:
        raise ConfigError("a transformers VLM has no recipe to take eval sets from; name one with --set "
                          "(synthvqa, easyvqa or a LLaVA .json file)")
    knobs = {}
    for item in args.knob:
        if "=" not in item:
            raise ConfigError(f"--knob takes NAME=VALUE, got {item!r}; e.g. --knob keep=64")
        k, v = item.split("=", 1)
        knobs[k.strip()] = yaml.safe_load(v)
    vlm = load_compressed(args.model, args.method, **knobs)
    data = get_dataset(args.dataset, args.split, n=args.n, image_folder=args.image_folder,
                       skip_malformed=args.skip_malformed)
    label = args.method or "uncompressed"
    out = Path(args.out) if args.out else Path("eval") / label
    res = evaluate(vlm, data, batch_size=args.batch_size or 8, max_new_tokens=args.max_new_tokens or 8,
                   out_dir=out, name=f"{args.dataset}-{args.split}", progress=not args.no_progress,
                   config={"model": args.model, "method": args.method, "knobs": knobs})
    print(format_table([res], title=f"== {args.model} ({label}{' ' + str(knobs) if knobs else ''})"))
    print(f"wrote {out}")
    return 0


def run(args: argparse.Namespace) -> int:
    from ..config import CONFIG_FILE, load_config, read_yaml
    from ..errors import CheckpointError
    from ..evaluate import format_table
    from ..model import CONFIG_NAME, find_model_dir
    from ..demo import evaluate_variants

    root = Path(args.model)
    model_dir = find_model_dir(root) or root  # a model, a train run (model/) or a demo run (train/model/)
    hub_id = not root.exists() and not root.is_absolute() and args.model.count("/") == 1 and not args.model.startswith(".")
    if not (model_dir / CONFIG_NAME).is_file() and (args.method or args.knob or (root / "config.json").is_file()
                                                    or hub_id):
        return run_transformers_vlm(args)  # a transformers VLM directory or hub id (org/name)
    if (model_dir / CONFIG_NAME).is_file() and (args.method or args.knob):
        from ..errors import ConfigError

        raise ConfigError(f"--method / --knob compress a transformers VLM; {model_dir} is a compactvl model, whose "
                          "compression is its recipe's. Evaluate it under other token ops or policies with "
                          "--eval.variants, e.g. --eval.variants '[{name: fastv, policies: [{policy: fastv, layer: 2, "
                          "keep: 0.5}]}]'")
    if not (model_dir / CONFIG_NAME).is_file():
        raise CheckpointError(f"{root} is neither a model directory ({CONFIG_NAME}) nor a run holding one (model/ "
                              "from compactvl train, train/model/ from compactvl demo); pass such a directory, "
                              "e.g. runs/demo")
    recipe = next((p for p in (model_dir / CONFIG_FILE, root / CONFIG_FILE) if p.is_file()), None)
    cfg = load_config(read_yaml(recipe) if recipe else None, getattr(args, "overrides", []))
    if args.dataset:
        cfg["data"]["eval"] = [{"name": args.dataset, "split": args.split, "n": args.n, "seed": 0,
                                "image_folder": args.image_folder, "skip_malformed": args.skip_malformed,
                                "difficulty": None}]
    elif args.n is not None:
        for spec in cfg["data"]["eval"]:
            spec["n"] = args.n
    if args.batch_size is not None:
        cfg["eval"]["batch_size"] = args.batch_size
    if args.max_new_tokens is not None:
        cfg["eval"]["max_new_tokens"] = args.max_new_tokens
    cfg = load_config(cfg)  # re-validate after the flags
    out = Path(args.out) if args.out else (root if model_dir != root else root.parent) / "eval"
    rows = evaluate_variants(model_dir, cfg, out, progress=not args.no_progress)
    for v in rows:
        print(format_table(v.results, title=f"== {v.method}"))
    return 0

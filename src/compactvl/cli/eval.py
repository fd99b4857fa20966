"""``compactvl eval MODEL [options] [--section.key VALUE ...]``: score a saved model on VQA sets.

    compactvl eval runs/demo                       # a training run: its model/ and its recipe's data.eval
    compactvl eval runs/demo/model --set easyvqa --split test --n 500 --batch-size 32
    compactvl eval runs/demo --eval.variants '[{name: avgpool-4, token_ops: [{op: avgpool, k: 8}]}]'
    compactvl eval path/to/llava-hf-model --set synthvqa --n 200 --method visionzip --knob tokens=64
                                                   # a transformers VLM (directory or hub id), compressed

Writes, per dataset (and variant), predictions.jsonl, metrics.json and the resolved config.yaml under --out
(default: MODEL_RUN/eval), and prints accuracy per category with the chance level. Earlier results are never
overwritten silently: the default folder becomes eval-2, eval-3, ... when eval/ already holds results; an explicit
--out that holds results needs --overwrite, which says what it replaces.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import CheckpointError, ConfigError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a saved model on VQA sets", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("model", help="a model directory (save_pretrained), a training run directory holding model/, or "
                   "'reference' (the committed reference model)")
    p.add_argument("--set", dest="dataset", default=None,
                   help="synthvqa, easyvqa or a LLaVA .json file (default: the run's data.eval)")
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=int, default=None, help="samples (default: the whole split)")
    p.add_argument("--seed", type=int, default=0, help="synthvqa / easyvqa: which samples (default 0)")
    p.add_argument("--difficulty", nargs="+", default=None, help="synthvqa object sizes: small medium large")
    p.add_argument("--distractors", nargs="+", type=int, default=None, metavar="N",
                   help="synthvqa: other objects per scene, N or LO HI (default: what the model trained on, when its "
                        "recipe trained on synthvqa; else each category's own range)")
    p.add_argument("--image-folder", default=None, help="for a LLaVA file: the folder its image paths are under")
    p.add_argument("--skip-malformed", action="store_true", help="for a LLaVA file: skip and count bad records")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--out", default=None, help="output directory (default: RUN/eval or MODEL/../eval; eval-2, "
                                              "eval-3, ... when it already holds results)")
    p.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    p.add_argument("--paired", action="store_true", help="with --method: also score the model uncompressed on the "
                   "same items and report the paired difference (95%% interval), agreement and KL at the first "
                   "answer token (paired.json)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--method", default=None, help="for a transformers VLM: the compression method (a token op or "
                   "layer policy name, e.g. visionzip, fastv); default none")
    p.add_argument("--knob", action="append", default=[], metavar="NAME=VALUE",
                   help="for a transformers VLM: a knob of --method (repeat), e.g. --knob tokens=64")
    p.set_defaults(func=run, overrides_allowed=True)


def data_knobs(args: argparse.Namespace, trained_on: list[dict] | None = None) -> dict:
    """``difficulty`` / ``distractors`` for --set: the flags, else (synthvqa) those of the synthvqa data the model
    trained on, said aloud, since the set's defaults (full clutter) are not what a recipe such as the demo trains on."""
    if args.dataset != "synthvqa":
        given = [f for f, v in (("--difficulty", args.difficulty), ("--distractors", args.distractors)) if v]
        if given:
            raise ConfigError(f"{' and '.join(given)} apply to synthvqa only, not {args.dataset}; leave them out")
        return {}
    knobs = {"difficulty": args.difficulty,
             "distractors": None if args.distractors is None else
             args.distractors[0] if len(args.distractors) == 1 else list(args.distractors)}
    trained = next((d for d in trained_on or [] if d.get("name") == "synthvqa"), None)
    if trained is not None and args.distractors is None and args.difficulty is None:
        same = {k: trained.get(k) for k in ("difficulty", "distractors")}
        if any(v is not None for v in same.values()):
            given = ", ".join(f"{k}={v}" for k, v in same.items() if v is not None)
            print(f"synthvqa as the model trained on it: {given} (--distractors / --difficulty change this)")
            return same
    return knobs


def holds_results(path: Path) -> bool:
    """A folder with evaluation results in it (metrics.json or predictions.jsonl at any depth)."""
    return path.is_dir() and any(p.name in ("metrics.json", "predictions.jsonl") for p in path.rglob("*"))


def output_dir(out: str | None, default: Path, overwrite: bool) -> Path:
    """Where results go: ``out`` (refused if it holds results, unless ``overwrite``), else ``default`` or the first
    free ``default-N``. Says what is replaced or why another name was taken."""
    if out is not None:
        path = Path(out)
        if holds_results(path):
            if not overwrite:
                raise ConfigError(f"--out {path} already holds evaluation results; pass --overwrite to replace them, "
                                  f"or choose another --out")
            print(f"replacing the results in {path} (--overwrite)")
        return path
    if not holds_results(default) or overwrite:
        if holds_results(default):
            print(f"replacing the results in {default} (--overwrite)")
        return default
    n = 2
    while holds_results(default.with_name(f"{default.name}-{n}")):
        n += 1
    new = default.with_name(f"{default.name}-{n}")
    print(f"{default} holds earlier results; writing to {new} (--overwrite replaces them instead)")
    return new


def run_transformers_vlm(args: argparse.Namespace) -> int:
    """Evaluate a transformers VLM (LLaVA, Qwen-VL, ...) compressed with --method through compactvl's adapters."""
    import yaml  # on demand: --help stays fast

    from ..compression import compress, load_compressed  # on demand: --help stays fast
    from ..data import get_dataset  # on demand: --help stays fast
    from ..evaluate import compare_results, eval_set_name, evaluate, format_table  # on demand: --help stays fast

    if not args.dataset:
        raise ConfigError("a transformers VLM has no recipe to take eval sets from; name one with --set "
                          "(synthvqa, easyvqa or a LLaVA .json file)")
    knobs = {}
    for item in args.knob:
        if "=" not in item:
            raise ConfigError(f"--knob takes NAME=VALUE, got {item!r}; e.g. --knob tokens=64")
        k, v = item.split("=", 1)
        knobs[k.strip()] = yaml.safe_load(v)
    vlm = load_compressed(args.model, args.method, **knobs)
    data = get_dataset(args.dataset, args.split, n=args.n, seed=args.seed, image_folder=args.image_folder,
                       skip_malformed=args.skip_malformed, **data_knobs(args))
    label = args.method or "uncompressed"
    out = output_dir(args.out, Path("eval") / label, args.overwrite)
    name = eval_set_name({"name": args.dataset, "split": args.split, **data_knobs(args)})
    kw = dict(batch_size=args.batch_size or 8, max_new_tokens=args.max_new_tokens or 8, name=name,
              progress=not args.no_progress)
    base = None
    if args.paired and args.method:  # the same model uncompressed, on the same items first
        base = evaluate(compress(vlm.model, None, processor=vlm.processor), data, out_dir=out / "uncompressed",
                        keep_first_logprobs=True, config={"model": args.model, "method": None}, **kw)
    res = evaluate(vlm, data, out_dir=out, reference=base, config={"model": args.model, "method": args.method,
                                                                     "knobs": knobs}, **kw)
    print(format_table([res], title=f"== {args.model} ({label}{' ' + str(knobs) if knobs else ''})"))
    if base is not None:
        pair = compare_results(base, res)
        print(f"{label} vs uncompressed on the same {pair.n} items: {pair.describe()}, KL(first answer token) "
              f"{res.kl_first_token:.4f}")
        (out / "paired.json").write_text(json.dumps({**pair.to_dict(), "kl_first_token": res.kl_first_token},
                                                    indent=1))
    print(f"wrote {out}")
    return 0


def run(args: argparse.Namespace) -> int:
    from ..config import CONFIG_FILE, load_config, read_yaml  # on demand: --help stays fast
    from ..evaluate import format_table  # on demand: --help stays fast
    from ..model import CONFIG_NAME, find_model_dir  # on demand: --help stays fast
    from ..sources import local_or_hub  # (the same)
    from ..demo import evaluate_variants  # on demand: --help stays fast

    from ..reference import resolve  # on demand: --help stays fast

    named = args.model
    args.model = resolve(args.model)  # the name "reference": the committed reference model, rebuilt once
    root = Path(args.model)
    model_dir = find_model_dir(root) or root  # a model, a train run (model/) or a demo run (train/model/)
    hub_id = not root.exists() and args.model.count("/") == 1 and local_or_hub(args.model) == "hub"  # or a typo
    if not (model_dir / CONFIG_NAME).is_file() and (args.method or args.knob or (root / "config.json").is_file()
                                                    or hub_id):
        return run_transformers_vlm(args)  # a transformers VLM directory or hub id (org/name)
    if (model_dir / CONFIG_NAME).is_file() and (args.method or args.knob):
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
        cfg["data"]["eval"] = [{"name": args.dataset, "split": args.split, "n": args.n, "seed": args.seed,
                                "image_folder": args.image_folder, "skip_malformed": args.skip_malformed,
                                **data_knobs(args, cfg["data"]["train"])}]
    elif args.n is not None:
        for spec in cfg["data"]["eval"]:
            spec["n"] = args.n
    if args.batch_size is not None:
        cfg["eval"]["batch_size"] = args.batch_size
    if args.max_new_tokens is not None:
        cfg["eval"]["max_new_tokens"] = args.max_new_tokens
    cfg = load_config(cfg)  # re-validate after the flags
    default = Path("runs/reference") if args.model != named else (root if model_dir != root else root.parent)
    out = output_dir(args.out, default / "eval", args.overwrite)  # not into the cache the reference is rebuilt in
    rows = evaluate_variants(model_dir, cfg, out, progress=not args.no_progress)
    for v in rows:
        print(format_table(v.results, title=f"== {v.method}"))
    return 0

"""``compactvl train RECIPE [options] [--section.key VALUE ...]``: train a VLM from a YAML recipe.

    compactvl train demo                                  # a packaged recipe, by name
    compactvl train recipes/demo.yaml --train.lr 1e-4     # a file, with dotted overrides
    compactvl train demo --resume                          # continue from the latest checkpoint in output_dir
    compactvl train demo --overwrite                       # start again, deleting the checkpoints in output_dir
    accelerate launch --num_processes 4 -m compactvl.cli train demo   # data parallel (one process per GPU)
    torchrun --nproc_per_node 4 -m compactvl.cli train demo           # the same with torchrun (or CPU slots)

After training, the model is exported to OUTPUT_DIR/model and evaluated on ``data.eval`` (skip with --no-eval);
the resolved config is saved beside every checkpoint and result.
"""
from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a VLM from a YAML recipe", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("recipe", help="a recipe file, or the name of a packaged recipe (e.g. demo)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint in output_dir (or from CHECKPOINT)")
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="stop after this optimizer step (a checkpoint is written; --resume continues)")
    p.add_argument("--overwrite", action="store_true",
                   help="start from step 0 even if output_dir holds checkpoints (they are deleted)")
    p.add_argument("--no-eval", action="store_true", help="do not evaluate on data.eval after training")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run, overrides_allowed=True)


def run(args: argparse.Namespace) -> int:
    from ..config import load_config  # loaded when the command runs: `compactvl --help` stays fast
    from ..device import default_device  # (the same)
    from ..train import Trainer, build_model, build_train_data  # (the same)

    cfg = load_config(args.recipe, getattr(args, "overrides", []))
    model = build_model(cfg).to(default_device())
    data = build_train_data(cfg["data"]["train"], model=model)
    trainer = Trainer(model, data, cfg, progress=not args.no_progress)
    res = trainer.fit(resume=args.resume, stop_at=args.stop_at, overwrite=args.overwrite)
    if trainer.rank != 0:
        return 0
    first, last = (res.losses[0], res.losses[-1]) if res.losses else (float("nan"), float("nan"))
    print(f"trained {res.steps}/{res.total_steps} steps: loss {first:.4f} -> {last:.4f}, "
          f"{res.samples_per_s:.2f} samples/s; checkpoint {res.checkpoint}")
    if res.interrupted:
        print(f"interrupted; continue with: compactvl train {args.recipe} --resume", file=sys.stderr)
        return 130
    if res.model_dir is None:
        print(f"stopped early; continue with: compactvl train {args.recipe} --resume")
        return 0
    print(f"model: {res.model_dir}")
    if not args.no_eval and cfg["data"]["eval"]:
        from ..evaluate import eval_set_name, evaluate, format_table  # only when there is something to evaluate
        from ..train import build_dataset  # (the same)

        results = []
        for spec in cfg["data"]["eval"]:
            name = eval_set_name(spec)
            results.append(evaluate(model, build_dataset(spec), cfg["eval"]["batch_size"],
                                    cfg["eval"]["max_new_tokens"], out_dir=res.output_dir / "eval" / name,
                                    name=name, config=cfg, progress=not args.no_progress,
                                    precision=cfg["eval"]["precision"]))
        print(format_table(results))
    run = res.output_dir
    print(f"next:\n  compactvl eval {run}                       # its data.eval again (or --set NAME)\n"
          f"  compactvl chat --model {run} --image IMAGE --prompt QUESTION\n"
          f"  compactvl bench --model {run} --method vanilla --method keep:0.5")
    return 0


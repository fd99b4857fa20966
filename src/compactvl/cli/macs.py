"""``compactvl macs``: analytic MACs of an LLM prefill for a token schedule (definition: compactvl.measure.macs).

    compactvl macs --llm llama-2-7b --visual 576 --text 64 --method fastv --layer 2 --keep 0.5 [--encoder NAME] [--json]
"""
from __future__ import annotations

import argparse
import json

from ..measure.macs import get_lm_config, llm_macs, lm_shape, load_schedules, schedule_for
from ..measure.presets import ENCODER_PRESETS, LM_PRESETS


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    SCHEDULES = load_schedules()  # with the schedules method files register beside their policies
    methods = "\n".join(f"  {m.name:<12} {m.help}" for m in SCHEDULES.values())
    p = subparsers.add_parser(
        "macs", help="analytic LLM MACs for a token schedule", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Print the tokens entering each decoder layer and the MACs they cost. One definition: per\n"
                    "layer, linear projections x tokens + 2*n^2*d_attn (full square); the LM head (one token) and\n"
                    "the vision side are reported separately. Fractions become counts by rounding half up.\n\n"
                    f"methods:\n{methods}",
        epilog="examples:\n"
               "  compactvl macs --llm llama-2-7b --visual 576 --text 64 --method fastv --layer 2 --keep 0.5\n"
               "  compactvl macs --llm qwen3-0.6b --visual 576 --text 64 --method keep --keep 0.25 --encoder "
               "clip-vit-l-336 --json")
    p.add_argument("--llm", required=True, help=f"LLM preset ({', '.join(LM_PRESETS)}) or a path to config.json "
                                                f"or its directory")
    p.add_argument("--visual", type=int, required=True, help="visual tokens entering the LLM before any pruning")
    p.add_argument("--text", type=int, required=True, help="text tokens of the prompt")
    p.add_argument("--method", default="vanilla", help=f"schedule method: {', '.join(SCHEDULES)} (default vanilla)")
    owners: dict[str, list[str]] = {}
    for m in SCHEDULES.values():
        for knob, text in m.knobs.items():
            owners.setdefault(knob, []).append(f"{m.name}: {text}")
    for knob, texts in owners.items():
        p.add_argument(f"--{knob}", default=None, help="; ".join(texts))
    p.add_argument("--encoder", default=None,
                   help=f"also count a vision encoder: preset ({', '.join(ENCODER_PRESETS)}) or config path")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run, _knobs=sorted(owners))
    return p


def run(args: argparse.Namespace) -> int:
    config = get_lm_config(args.llm)
    knobs = {k: getattr(args, k) for k in args._knobs if getattr(args, k) is not None}
    schedule = schedule_for(args.method, lm_shape(config).layers, args.visual, args.text, **knobs)
    report = llm_macs(config, schedule, name=args.llm)
    if args.encoder is not None:
        report = report.with_vision(args.encoder)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    return 0

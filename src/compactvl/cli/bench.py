"""``compactvl bench``: measured prefill (time to first token), decode ms/token, peak memory and throughput of an LM
under token-reduction methods, beside their analytic MACs (definitions: compactvl.bench, docs/benchmarks.md).

    compactvl bench --llm qwen3-0.6b --visual 576,2880 --text 64 --batch 1,8 \\
        --method vanilla --method keep:0.25 --method keep:0.125 --method fastv:layer=2,keep=0.5 --out runs/bench
    compactvl bench --vlm path/to/qwen2-vl --visual 1024 --method vanilla --method keep:0.25
    compactvl bench --llm smollm2-135m-instruct --visual 576 --batch 8 --decode-tokens 0 \\
        --op cdpruner:tokens=64 --op divprune:tokens=64 --op vispruner:tokens=64 --op mmtok:tokens=64 --out runs/ops
"""
from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
from pathlib import Path

from ..errors import ConfigError
from ..measure.presets import LM_PRESETS

METHOD_HELP = """\
method grammar (repeat --method; vanilla is added when missing):
  vanilla                          every visual token enters the LM
  keep:F                           a pre-LLM token op keeps fraction F of the visual tokens (the LM gets kept(V, F))
  NAME:knob=value,...              a registered layer policy, e.g. fastv:layer=2,keep=0.5
                                   pyramiddrop:layers=[7,14,21],ratio=0.5   sparsevlm:retain=192
                                   (values are JSON; lists as [7,14,21] or 7/14/21)
  '{"policy": "fastv", ...}'       a JSON layer-policy recipe (optional "label")
  model                            with --model: the loaded model's own layer policies

op grammar (repeat --op; times a pre-LLM token op's forward beside the vanilla prefill):
  NAME:knob=value,...              a registered token op, budget as tokens=K (count per image) or keep=F
                                   (fraction), mapped by the op as in compress/eval: cdpruner:tokens=64,
                                   divprune:keep=0.1, visionzip:dominant=54,contextual=10, prumerge
  '{"op": "divprune", "tokens": 64}'
                                   a JSON recipe entry, or a list of entries (a pipeline); optional "label"
  Each op gets a sqrt(V) x sqrt(V) grid (1 x V if V is no square) of --op-width channels (a synthetic encoder
  output with CLS attention, keys and features, plus prompt text embeddings of that width), batch as --batch; the
  report gives its median time, the vanilla prefill median of the same visual count and batch, and their ratio,
  flagged above --op-limit.
"""


def _ints(text: str) -> list[int]:
    try:
        out = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of whole numbers, e.g. 1,8") from None
    if not out:
        raise argparse.ArgumentTypeError("give at least one number")
    return out


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="measure prefill / decode latency, memory and throughput per method",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Measure time to first token (prefill), decode ms/token, peak memory and throughput of an LM\n"
                    "for each method x visual-token count x batch size, beside the analytic MACs ratio; write\n"
                    "bench.json (schema: compactvl/bench/bench_schema.json), bench.md and PNG plots.\n\n"
                    + METHOD_HELP,
        epilog="examples:\n" + "\n".join("  " + line.strip() if line.strip().startswith("compactvl") else "      "
                                          + line.strip() for line in __doc__.split("\n\n", 1)[1].strip().splitlines()))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--llm", help=f"LM preset ({', '.join(LM_PRESETS)}) or config path; built with RANDOM weights "
                                   f"(speed does not depend on the values)")
    src.add_argument("--model", help="a saved compactvl model directory: its LM is benchmarked with synthetic visual "
                                     "embeddings")
    src.add_argument("--vlm", help="a transformers VLM directory or hub id (LLaVA, LLaVA-NeXT/OneVision, "
                                   "Qwen2/2.5/3-VL, Qwen3-VL-MoE, InternVL): its language model, with its own weights, "
                                   "is benchmarked with synthetic visual embeddings")
    p.add_argument("--method", action="append", default=None,
                   help="method spec (repeatable; see the grammar above). Default: vanilla, keep:0.25")
    p.add_argument("--op", action="append", default=None,
                   help="token-op spec whose forward is timed (repeatable; see the op grammar above). With --op and no "
                        "--method only vanilla runs")
    p.add_argument("--op-width", type=int, default=1024,
                   help="--op: channels of the synthetic visual tokens, i.e. the encoder width (default 1024, CLIP "
                        "ViT-L/14)")
    p.add_argument("--op-limit", type=float, default=3.0,
                   help="--op: flag ops that take more than this percentage of the vanilla prefill (default 3)")
    p.add_argument("--visual", type=_ints, default=[576], help="visual tokens before any reduction, e.g. 576,2880")
    p.add_argument("--text", type=int, default=64, help="text tokens of the prompt (default 64)")
    p.add_argument("--prefix", type=int, default=8, help="text tokens before the image (default 8)")
    p.add_argument("--batch", type=_ints, default=[1], help="batch sizes, e.g. 1,8")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1; the first one also counts "
                                                         "the tokens entering each layer)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs; medians are reported (default 5)")
    p.add_argument("--decode-tokens", type=int, default=8, help="decode steps timed after each prefill (default 8)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 (default: float32 on CPU, "
                                                   "bfloat16 on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--position-policy", default="keep", help="keep | compact (for --llm)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--isolate", action="store_true",
                   help="run every measurement in a fresh process (peak memory then does not depend on what ran "
                        "before; rebuilds the model each time)")
    p.add_argument("--accuracy", default=None,
                   help='JSON of accuracies per method label, e.g. {"vanilla": 0.62, "keep:0.25": 0.58} or '
                        '{"keep:0.25": "runs/k25/eval/metrics.json"} (compactvl eval output), for the '
                        'accuracy-vs-MACs Pareto plot')
    p.add_argument("--out", default=None, help="directory for bench.json, bench.md and the PNG plots")
    p.add_argument("--overwrite", action="store_true", help="replace the benchmark already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _check_out_dir(out: str, overwrite: bool = False) -> None:
    """--out must be a directory this process can write (created if missing), without an earlier report unless
    --overwrite."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {out} is a file; bench writes bench.json, bench.md and plots into a directory, so "
                          f"give a directory (e.g. --out {path.with_suffix('')}-bench)")
    if (path / "bench.json").is_file():
        if not overwrite:
            raise ConfigError(f"--out {out} already holds a benchmark (bench.json); pass --overwrite to replace it, "
                              f"or choose another --out")
        print(f"replacing the benchmark in {out} (--overwrite)", file=sys.stderr)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--out {out} is not writable ({e.strerror or e}); give a writable directory") from None


def run(args: argparse.Namespace) -> int:
    from ..bench import (BenchSettings, load_bench_model, markdown, parse_method, parse_op,  # lazy: the package
                         run_bench, validate_report, write_outputs)  # imports the model, adapters and policies

    if args.accuracy is not None and args.out is None:
        raise ConfigError("--accuracy draws a plot into --out; give --out DIR as well")
    if args.out is not None:
        _check_out_dir(args.out, args.overwrite)  # before the benchmark runs, not after it (results would be lost)
    from ..reference import resolve  # on demand: --help stays fast

    model_dir = resolve(args.model) if args.model else None  # the name "reference": the committed reference model
    model_kw = dict(llm=args.llm, model_dir=model_dir, vlm=args.vlm, device=args.device, dtype=args.dtype,
                    seed=args.seed, position_policy=args.position_policy)
    ops = [parse_op(o) for o in args.op or []]  # before the model loads: a bad spec fails at once
    model = load_bench_model(**model_kw)
    default = ["vanilla"] if ops else ["vanilla", "keep:0.25"]
    methods = [parse_method(m, model.model_policies) for m in (args.method or default)]
    settings = BenchSettings(visual=args.visual, text=args.text, prefix=args.prefix, batch=args.batch,
                             warmup=args.warmup, repeats=args.repeats, decode_tokens=args.decode_tokens,
                             seed=args.seed, isolate=args.isolate, threads=args.threads, op_width=args.op_width,
                             op_limit=args.op_limit)
    command = "compactvl bench " + shlex.join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None
    report = run_bench(model, methods, settings, model_kw=model_kw, progress=not args.no_progress, command=command,
                       ops=ops)
    if args.out is not None:
        paths = write_outputs(report, args.out, args.accuracy)
        print(markdown(report))
        print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    else:
        print(markdown(report))
    if importlib.util.find_spec("jsonschema") is not None:  # a test extra; the report is checked when it is there
        try:
            validate_report(report)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    over = [f"{r['op']} ({100 * r['share']:.2f} %, visual {r['visual_input']}, batch {r['batch']})"
            for r in report.get("ops") or [] if r["over_limit"]]
    if over:  # a finding, not a failure: the exit status stays 0
        print(f"warning: token ops above --op-limit {args.op_limit:g} % of the vanilla prefill: {', '.join(over)}",
              file=sys.stderr)
    mismatched = [r["method"] for r in report["results"] if r["schedule"]["matches"] is False]
    if mismatched:
        print(f"error: the tokens entering the layers differ from the MACs schedule for {', '.join(mismatched)} "
              f"(see schedule.mismatch in the JSON)", file=sys.stderr)
        return 1
    return 0

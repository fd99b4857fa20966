"""The ``compactvl bench`` outputs: a Markdown page (machine, model, command, one table row per measurement) and
``write_outputs`` (bench.json, bench.md and the PNG plots of :mod:`compactvl.plots`)."""
from __future__ import annotations

import json
from pathlib import Path

from .. import plots
from .pareto import accuracy_points, load_accuracy


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


def markdown(report: dict) -> str:
    """A Markdown page: machine, model, command, then one table row per measurement."""
    env, mod, st = report["environment"], report["model"], report["settings"]
    dev = env["gpu"] if env["device"] == "cuda" else f"{env['cpu']} ({env['cpu_count']} logical CPUs)"
    lines = [
        f"# compactvl bench: {mod['name']}",
        "",
        f"- machine: {dev}; torch {env['torch']}, transformers {env['transformers']}, {env['torch_threads']} torch "
        f"threads; load average at start {_fmt(env['loadavg_start'][0] if env['loadavg_start'] else None)}, at end "
        f"{_fmt(env['loadavg_end'][0] if env['loadavg_end'] else None)}",
        f"- model: {mod['model_type']}, {mod['num_layers']} layers, hidden {mod['hidden_size']}, "
        f"{mod['parameters'] / 1e6:.1f}M parameters ({mod['weights']} weights), {mod['dtype']} on {mod['device']}, "
        f"attention {mod['attn_implementation']}",
        f"- inputs: {st['text']} text tokens ({st['prefix']} before the image), visual tokens {st['visual']}, batch "
        f"{st['batch']}; {st['warmup']} warm-up + {st['repeats']} timed repeats, {st['decode_tokens']} decode steps "
        f"each",
    ]
    if report.get("command"):
        lines.append(f"- command: `{report['command']}`")
    lines += [
        "",
        "| method | visual in → LLM (last layer) | batch | prefill ms, median [IQR] | speedup | MACs ratio | "
        "ideal speedup | efficiency | scoring % | decode ms/token | samples/s | decode tok/s | peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        p, d, sch = r["prefill_ms"], r["decode_ms_per_token"], r["schedule"]
        flag = "" if sch["matches"] is not False else " ⚠ schedule mismatch"
        lines.append(
            f"| {r['method']}{flag} | {r['visual_input']} → {sch['visual'][0]} ({sch['visual'][-1]}) | {r['batch']} | "
            f"{p['median']:.1f} [{p['iqr']:.1f}] | {_fmt(r['speedup'])}× | {r['macs']['ratio']:.3f} | "
            f"{r['macs']['ideal_speedup']:.2f}× | {_fmt(r['efficiency'])} | "
            f"{_fmt(None if r['score_share'] is None else 100 * r['score_share'], '.1f')} | "
            f"{_fmt(d['median'] if d else None, '.1f')} | {r['throughput']['prefill_samples_per_s']:.2f} | "
            f"{_fmt(r['throughput']['decode_tokens_per_s'], '.1f')} | {r['memory']['peak_mb']:.0f} |")
    for s in report["skipped"]:
        lines.append(f"| {s['method']} | {s['visual_input']} | {s['batch']} | skipped: {s['reason']} |" + " – |" * 9)
    if report.get("ops"):
        lines += ["", "Token-op scoring overhead (op forward on synthetic inputs vs the uncompressed LM prefill):", "",
                  "| op | visual in → out | batch | width | op ms, median [IQR] | vanilla prefill ms | share % | "
                  "limit % |", "|---|---|---|---|---|---|---|---|"]
        for r in report["ops"]:
            o, share = r["op_ms"], r["share"]
            flag = " ⚠ over the limit" if r["over_limit"] else ""
            lines.append(f"| {r['op']}{flag} | {r['visual_input']} → {r['tokens_out']} | {r['batch']} | {r['width']} | "
                         f"{o['median']:.2f} [{o['iqr']:.2f}] | {_fmt(r['prefill_ms'], '.1f')} | "
                         f"{_fmt(None if share is None else 100 * share, '.2f')} | {100 * r['limit']:g} |")
        notes = sorted({n for r in report["ops"] for n in r["notes"]})
        lines += [f"- note: {n}" for n in notes]
    if report.get("accuracy"):
        lines += ["", "| method | LLM GMACs | accuracy | Pareto |", "|---|---|---|---|"]
        lines += [f"| {a['method']} | {a['llm_macs'] / 1e9:.2f} | {a['accuracy']:.4g} | {'yes' if a['pareto'] else ''} |"
                  for a in report["accuracy"]]
    mem = {r["memory"]["method"] for r in report["results"]}
    lines += ["", f"Memory: {', '.join(sorted(mem))} (definitions: docs/benchmarks.md, \"compactvl bench\").", ""]
    return "\n".join(lines)


def write_outputs(report: dict, out: str | Path, accuracy: str | Path | None = None) -> dict[str, Path]:
    """Write bench.json, bench.md and the PNG plots into ``out``; returns {kind: path}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    if accuracy is not None:
        report["accuracy"] = accuracy_points(report, load_accuracy(accuracy))
    report["plots"] = {}
    if plots.available():
        written["prefill_vs_visual"] = plots.prefill_vs_visual(report, out / "prefill_vs_visual.png")
        if report["accuracy"]:
            written["accuracy_vs_macs"] = plots.accuracy_vs_macs(report, out / "accuracy_vs_macs.png")
        report["plots"] = {k: p.name for k, p in written.items()}
    else:
        report["plots"] = {"note": "matplotlib is not installed; pip install 'compactvl[plot]' for PNG plots"}
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    (out / "bench.md").write_text(markdown(report))
    written["json"], written["markdown"] = out / "bench.json", out / "bench.md"
    return written

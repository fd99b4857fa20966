"""The report of ``compactvl demo --compare``: ``compare.json``, ``compare.md``, ``compare.png`` and ``curves.png`` over
the systems finished so far, each paired item by item with the baseline and with the question-only control."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Sequence

from ..atomic import write_file_atomically
from ..controls import QUESTION_ONLY, question_only_result, question_prior
from ..demo import RESULTS, VariantResult
from ..errors import CompactVLError
from ..evaluate import compare_results
from ..hardware import machine
from ..plots import accuracy_bars, loss_curves
from .suite import CHART, COMPARE, CURVES, TABLE, System, _eval_rows, _finished

UNRECORDED = " (aux. not recorded)"  # a curve drawn as logged: the run predates recording its auxiliary losses


def task_losses(train: dict) -> dict:
    """The task (cross-entropy) part of a run's loss per step: the logged loss less its auxiliary terms (MoE balance,
    SIP), so that systems with and without them compare. ``known`` is False when a step's auxiliary part was not
    recorded (runs before compactvl recorded it): the logged losses are returned as they are."""
    aux = train.get("aux_losses") or [None] * len(train["losses"])
    known = len(aux) == len(train["losses"]) and all(a is not None for a in aux)
    return {"losses": [x - a for x, a in zip(train["losses"], aux)] if known else list(train["losses"]), "known": known}


def _question_only(done: dict, base: System | None, log: Callable[[str], None]) -> tuple | None:
    """The question-only control (``compactvl.controls``) on a budget's test items, fitted on its systems' training
    data: its result per set, its prior, and that data (systems trained on other data are not paired with it). None,
    and a line in the log, when it cannot be scored (the training data no longer readable, a set scored on several
    answers)."""
    if not done:
        return None
    first = base or next(iter(done.values()))
    try:
        prior = question_prior(first.cfg["data"]["train"])
        results = [question_only_result(prior, r) for r in _eval_rows(Path(first.cfg["output_dir"]), first.cfg)]
    except CompactVLError as e:
        log(f"the question-only control is left out of budget {first.budget}: {e}")
        return None
    return results, prior, first.cfg["data"]["train"]


def write_summary(suite: dict, systems: Sequence[System], out: Path, quick: bool, overrides: Sequence[str],
                  command: str | None, seconds: float, log: Callable[[str], None] = print) -> dict:
    """compare.json / compare.md / compare.png / curves.png over the systems finished so far."""
    rows, charts, curves, controls = [], {}, {}, {}
    for label in dict.fromkeys(s.budget for s in systems):
        group = [s for s in systems if s.budget == label]
        done = {s.name: s for s in group if _finished(Path(s.cfg["output_dir"]), s.cfg, quick)}
        base = done.get(suite["baseline"])
        base_results = _eval_rows(Path(base.cfg["output_dir"]), base.cfg) if base else None
        blind, prior, blind_data = _question_only(done, base, log) or (None, None, None)
        if blind:
            controls[label] = {r.dataset: {"n": r.n, "accuracy": r.accuracy, "ci95": list(r.ci95), "chance": r.chance,
                                           "train_pairs": prior.pairs,  # test questions word for word in training:
                                           "seen_in_training": prior.seen(x["question"] for x in r.predictions),
                                           "vs_baseline": (
                                               compare_results(b, r).to_dict() if b else None)}
                               for r, b in zip(blind, base_results or [None] * len(blind))}
        for s in group:
            if s.name not in done:  # not run, interrupted, or run with another config
                rows.append({"budget": label, "system": s.name, "recipe": s.recipe, "status": "not run yet"})
                continue
            run = json.loads((Path(s.cfg["output_dir"]) / RESULTS).read_text())
            results = _eval_rows(Path(s.cfg["output_dir"]), s.cfg)
            charts.setdefault(label, []).append(VariantResult(s.name, {}, {}, results))
            ce = task_losses(run["train"])
            curves.setdefault(label, {})[s.name if ce["known"] else s.name + UNRECORDED] = ce["losses"]
            r0 = run["results"][0]
            rows.append({
                "budget": label, "system": s.name, "recipe": s.recipe, "status": "done", "dir": s.cfg["output_dir"],
                "visual_tokens": r0["visual_tokens"], "llm_gmacs": r0["llm_gmacs"], "expert_gmacs": r0["expert_gmacs"],
                "train_steps": run["train"]["steps"], "train_samples": run["train"]["samples"],
                "final_loss": run["train"]["final_loss"], "final_task_loss": ce["losses"][-1] if ce["known"] else None,
                "precision": run["train"]["precision"],
                "train_s": run["timings"]["train_s"], "eval_s": run["timings"]["eval_s"],
                "encode_s": run["train"].get("feature_cache", {}).get("seconds"),  # within train_s; absent before
                "machine": run["machine"].get("gpu") or run["machine"].get("cpu"),
                "sets": {r.dataset: {"n": r.n, "accuracy": r.accuracy, "ci95": list(r.ci95), "chance": r.chance,
                                     "vs_baseline": (compare_results(b, r).to_dict() if base and s is not base
                                                     else None),
                                     "vs_question_only": (compare_results(q, r).to_dict()
                                                          if q and s.cfg["data"]["train"] == blind_data else None)}
                         for r, b, q in zip(results, base_results or [None] * len(results),
                                            blind or [None] * len(results))}})
        if blind and label in charts:
            charts[label].append(VariantResult(QUESTION_ONLY, {}, {}, blind))
    summary = {"suite": suite["name"], "baseline": suite["baseline"], "quick": quick,
               "command": command or " ".join(["compactvl", "demo", *sys.argv[2:]]), "machine": machine(),
               "overrides": list(overrides), "seconds_this_invocation": seconds, "systems": rows,
               "question_only": controls}
    out.mkdir(parents=True, exist_ok=True)
    write_file_atomically(out / COMPARE, json.dumps(summary, indent=1, default=str))
    write_file_atomically(out / TABLE, markdown_table(summary))
    for label, got in charts.items():  # one chart per budget; the first budget's under the plain names
        tag = "" if label == next(iter(charts)) else f"-{label.replace(' ', '_')}"
        accuracy_bars(got, out / CHART.replace(".png", f"{tag}.png"),
                      f"compactvl demo --compare {suite['name']}: budget {label} visual tokens (as trained)")
        unknown = any(name.endswith(UNRECORDED) for name in curves[label])
        what = ("training loss per step (cross-entropy; those marked: as logged, auxiliary losses included)"
                if unknown else "training cross-entropy per step (auxiliary losses removed)")
        loss_curves(curves[label], out / CURVES.replace(".png", f"{tag}.png"),
                    f"{what}, budget {label} ({suite['name']})")
    log("\n" + markdown_table(summary))
    log(f"wrote {out / COMPARE} and {out / TABLE}")
    return summary


def _train_seconds(row: dict) -> str:
    """Training seconds, with the part spent encoding the training images when it was recorded (a system reading a
    cache shared with an earlier one spends almost none)."""
    enc = row.get("encode_s")
    return f"{row['train_s']:.0f}" + ("" if enc is None else f" ({enc:.0f} encoding)")


def _accuracy(x: dict) -> str:
    return f"{x['accuracy']:.3f} [{x['ci95'][0]:.3f}, {x['ci95'][1]:.3f}] (n={x['n']})"


def _paired(v: dict | None, none: str) -> str:
    return none if v is None else (f"{v['difference']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]"
                                   + (" (noise)" if v["within_noise"] else ""))


def markdown_table(summary: dict) -> str:
    """One table per budget: tokens, MACs, steps, seconds, and per set the accuracy [95 % CI] and the paired
    differences [95 % CI] (within the noise or not) with the baseline and with the question-only control, whose own
    row comes first."""
    lines = [f"# Comparison `{summary['suite']}`{' (--quick: tiny random parts, meaningless numbers)' if summary['quick'] else ''}",
             "", f"Baseline: `{summary['baseline']}`. Command: `{summary['command']}`.", ""]
    controls = summary.get("question_only") or {}
    if controls:
        lines += [f"The {QUESTION_ONLY} row answers each test question with the answer that the same question text "
                  "has most often in the systems' training data (compactvl.controls); a system that does not beat "
                  "it outside the noise has not shown that it uses the image on that set.", ""]
    for label in dict.fromkeys(r["budget"] for r in summary["systems"]):
        group = [r for r in summary["systems"] if r["budget"] == label]
        sets = next((list(r["sets"]) for r in group if r["status"] == "done"), [])
        lines += [f"## Budget: {label} visual tokens", "",
                  "| " + " | ".join(["system", "tokens", "LLM GMACs", "steps", "train s", "machine"]
                                    + [f"{s} accuracy [95% CI] | Δ vs baseline [95% CI] | Δ vs question-only [95% CI]"
                                       for s in sets]) + " |",
                  "|---" * (6 + 3 * len(sets)) + "|"]
        if label in controls:
            c = controls[label]
            cells = [f"{_accuracy(c[s])}, {c[s]['seen_in_training']} questions seen in training | "
                     f"{_paired(c[s]['vs_baseline'], '–')} | control" if s in c else "– | – | –" for s in sets]
            pairs = next(iter(c.values()))["train_pairs"]
            lines.append(f"| {QUESTION_ONLY} | 0 | – | – | – | no model, {pairs} training pairs | "
                         + " | ".join(cells) + " |")
        for r in group:
            if r["status"] != "done":
                lines.append(f"| {r['system']} | not run yet |" + " |" * (4 + 3 * len(sets)))
                continue
            cells = [f"{_accuracy(r['sets'][s])} | {_paired(r['sets'][s]['vs_baseline'], 'baseline')} | "
                     f"{_paired(r['sets'][s].get('vs_question_only'), '–')}" for s in sets]
            lines.append(f"| {r['system']} | {r['visual_tokens']} | {r['llm_gmacs']:.3g} | {r['train_steps']} | "
                         f"{_train_seconds(r)} | {r['machine']}, {r['precision']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)

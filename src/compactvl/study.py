"""``compactvl study``: training-free methods × budgets × evaluation sets on one model, each cell compared with the
same model uncompressed on the same items.

For every training-free method the registries hold that this model can run, at every budget its knobs reach
(``keep`` = 50, 25, 12.5 and 6.25 % of the visual tokens by default; ``random`` over 3 seeds), and every
evaluation set, a cell reports:
- accuracy with its 95 % Wilson interval, and per category;
- retention against the uncompressed model with a 95 % paired bootstrap interval, the paired difference, McNemar's p,
  the agreement of the answers and the KL divergence at the first answer token (the last two need no labels);
- the visual tokens entering the LM and each layer, the LLM MACs ratio (one prefill counted by ``CountingPolicy``),
  and the LM's measured time and speedup against the uncompressed run (``lm_seconds``; encoding is reported apart).

The model is a saved CompactVLM (the method's op is appended to the recipe's token ops, its policy added to the
recipe's policies) or a transformers VLM through ``compress``. Cells are cached as JSON under ``OUT/cells``: a
killed study continues where it stopped, with the same figures. A cell that fails is recorded with its reason, and
the rest goes on. Writes ``study.json``, ``study.md``, ``retention_vs_speedup.png`` and
``category_retention.png``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

from .atomic import write_file_atomically
from .compression import CompressedVLM, compress, load_compressed, op_spec, policy_spec
from .data import get_dataset
from .errors import CompactVLError, ConfigError
from .evaluate import EvalResult, compare_results, eval_set_name, evaluate
from .measure.counted import measured_schedule
from .model import CompactVLM, find_model_dir
from .ops.base import build_ops
from .plots import available as plots_available, study_charts
from .reference import resolve
from .registry import POLICIES, TOKEN_OPS
from .schedules import Budget
from .stats import retention
from .train.feature_cache import FeatureCache

BUDGETS = (0.5, 0.25, 0.125, 0.0625)
RANDOM_SEEDS = (0, 1, 2)
CELLS = "cells"


@dataclass
class StudySettings:
    sets: list[dict]  # dataset specs: {name, split, n, ...}
    budgets: Sequence[float] = BUDGETS
    methods: Sequence[str] | None = None  # None: every method the model can run
    batch_size: int = 16
    max_new_tokens: int = 8
    seeds: Sequence[int] = RANDOM_SEEDS

    def key(self) -> str:
        d = dict(sets=self.sets, budgets=list(self.budgets), methods=None if self.methods is None else
                 list(self.methods), max_new_tokens=self.max_new_tokens, seeds=list(self.seeds))
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Method:
    name: str
    kind: str  # "op" | "policy"
    reason: str | None = None  # why it cannot run on this model (None: it can)
    seeds: Sequence[int | None] = field(default_factory=lambda: [None])


def methods_for(model, sample, n_tokens: int, names: Sequence[str] | None = None) -> list[Method]:
    """The training-free methods of the registries and whether this model can run them (a reason when not): each
    is built at keep = 0.5 and run on one sample."""
    out = []
    ops = sorted({TOKEN_OPS.get(n).name for n in TOKEN_OPS.names()})
    pols = POLICIES.names()
    wanted = names if names is not None else ops + pols
    for name in wanted:
        if name not in TOKEN_OPS and name not in POLICIES:
            raise ConfigError(f"unknown method '{name}'; token ops: {', '.join(ops)}; layer policies: "
                              f"{', '.join(pols)}")
        kind = "op" if name in TOKEN_OPS else "policy"
        m = Method(name, kind, seeds=[0, 1, 2] if name == "random" else [None])
        try:
            spec = _spec(m, model, Budget(fraction=0.5), n_tokens, None)
            with _variant_context(model, spec) as variant:
                _measure(variant, sample)
        except (CompactVLError, TypeError, ValueError, RuntimeError) as e:
            m.reason = str(e).split("\n")[0][:300]
        out.append(m)
    return out


def _spec(m: Method, model, budget: Budget, n_tokens: int, seed: int | None) -> dict:
    """The variant of ``model`` running method ``m`` at ``budget``: {"token_ops": [...]} or {"policies": [...]}."""
    if m.kind == "op":
        spec = op_spec(m.name, {"keep": budget.fraction}, n_tokens)
        if seed is not None:
            spec["seed"] = seed
        if isinstance(model, CompactVLM):
            ops = [*model.config.token_ops, spec]
            pipe = build_ops(ops, model.token_ops.in_channels)
            if any(True for _ in pipe.parameters()) and not any(True for _ in model.token_ops.parameters()):
                raise ConfigError(f"{m.name} has learned weights; a study compares training-free methods")
            if pipe.out_channels != model.token_ops.out_channels:
                raise ConfigError(f"{m.name} changes the channel width the projector was trained on")
            return {"token_ops": ops}
        return {"ops": [spec]}
    spec = policy_spec(m.name, {"keep": budget.fraction})
    if isinstance(model, CompactVLM):
        return {"policies": [*model.config.policies, spec]}
    return {"policies": [spec]}


def _cell_id(method: str, budget: float, seed: int | None, dataset: str) -> str:
    return f"{method}-keep{budget:g}" + (f"-seed{seed}" if seed is not None else "") + f"-{dataset}"


def _variant_context(model, spec: dict):
    """A context manager giving the model under ``spec`` (a CompactVLM variant, or a compressed transformers VLM)."""
    if isinstance(model, CompactVLM):
        return model.variant(**spec)
    vlm = compress(model.model, None, processor=model.processor, **spec)
    return _Same(vlm)


class _Same:
    def __init__(self, obj):
        self.obj = obj

    def __enter__(self):
        return self.obj

    def __exit__(self, *exc):
        return False


def _measure(model, sample) -> dict:
    """Visual tokens entering the LM and each layer, and LLM GMACs (CompactVLM); the visual tokens a transformers
    VLM's LM receives for ``sample`` (one generate call)."""
    if isinstance(model, CompactVLM):
        return measured_schedule(model, sample)
    model.generate([sample.question], [sample.images], max_new_tokens=1)
    return {"visual_tokens": model.last["visual_tokens"][0]}


def run_study(model, settings: StudySettings, out_dir: str | Path, progress: bool = True,
              log=print) -> dict:
    """Run (or continue) the study of ``model`` (a CompactVLM or a ``compress``-ed transformers VLM) into
    ``out_dir``; returns the report written to ``study.json``. A CompactVLM with frozen encoders encodes each image
    once for all cells (``FeatureCache``; the uncompressed run fills it, so every cell reads the same features)."""
    cache = isinstance(model, CompactVLM) and model.feature_cache is None and not model.config.train_encoders
    if cache:
        FeatureCache().attach(model)
    try:
        return _run_study(model, settings, out_dir, progress, log)
    finally:
        if cache:
            model.feature_cache = None


def _run_study(model, settings: StudySettings, out_dir: str | Path, progress: bool, log) -> dict:
    out = Path(out_dir)
    cells_dir = out / CELLS
    cells_dir.mkdir(parents=True, exist_ok=True)
    key = settings.key()
    marker = out / "settings.json"
    if marker.is_file() and json.loads(marker.read_text()).get("key") != key:
        raise ConfigError(f"{out} holds a study with other settings; choose another --out (or delete {out})")
    write_file_atomically(marker, json.dumps({"key": key, "sets": settings.sets}, indent=1, default=str))
    sets = [(eval_set_name(s), get_dataset(s["name"], s.get("split", "test"), n=s.get("n"), seed=s.get("seed", 0),
                                           difficulty=s.get("difficulty"), distractors=s.get("distractors")))
            for s in settings.sets]
    for (name, ds), s in zip(sets, settings.sets):
        if s.get("n") and len(ds) < s["n"]:
            log(f"{name}: {len(ds)} items exist, fewer than the {s['n']} asked for; using {len(ds)}")
    kw = dict(batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens)
    base: dict[str, EvalResult] = {}
    base_measure: dict[str, dict] = {}
    for name, ds in sets:  # the uncompressed model: the reference of every cell (its first-token distributions)
        base[name] = evaluate(model, ds, name=name, keep_first_logprobs=True, progress=False, **kw)
        base_measure[name] = _measure(model, ds[0])
    first = sets[0][1][0]
    n_tokens = base_measure[sets[0][0]]["visual_tokens"] // max(1, len(first.images))  # per image
    methods = methods_for(model, first, n_tokens, settings.methods)
    for m in methods:
        if m.reason:
            log(f"{m.name}: not run ({m.reason})")
    runnable = [m for m in methods if m.reason is None]
    todo = [(m, b, seed, name, ds) for m in runnable for b in settings.budgets for seed in m.seeds for name, ds in sets]
    cells = []
    for m, budget, seed, name, ds in tqdm(todo, disable=not progress, desc="study", unit="cell"):
        cid = _cell_id(m.name, budget, seed, name)
        path = cells_dir / f"{cid}.json"
        if path.is_file():
            cells.append(json.loads(path.read_text()))
            continue
        cell = {"id": cid, "method": m.name, "kind": m.kind, "keep": budget, "seed": seed, "dataset": name}
        try:
            spec = _spec(m, model, Budget(fraction=budget), n_tokens, seed)
            with _variant_context(model, spec) as variant:
                measured = _measure(variant, ds[0])
                r = evaluate(variant, ds, name=name, reference=base[name], progress=False, **kw)
            cell.update(_cell_figures(base[name], r, base_measure[name], measured), status="ok", spec=spec)
        except (CompactVLError, RuntimeError, ValueError) as e:  # recorded; the study goes on
            cell.update(status="failed", reason=f"{type(e).__name__}: {e}")
        write_file_atomically(path, json.dumps(cell, indent=1, default=str))
        cells.append(cell)
    report = {"settings": {"sets": settings.sets, "budgets": list(settings.budgets), "batch_size": settings.batch_size,
                           "max_new_tokens": settings.max_new_tokens, "key": key},
              "uncompressed": {name: {**_result_summary(r), **base_measure[name]} for name, r in base.items()},
              "methods": [{"name": m.name, "kind": m.kind, "runs": m.reason is None, "reason": m.reason}
                          for m in methods],
              "cells": cells}
    write_file_atomically(out / "study.json", json.dumps(report, indent=1, default=str))
    write_file_atomically(out / "study.md", markdown(report))
    if plots_available() and any(c["status"] == "ok" for c in cells):
        report["charts"] = [str(p) for p in study_charts(report, out)]
    return report


def _result_summary(r: EvalResult) -> dict:
    return {"n": r.n, "accuracy": r.accuracy, "ci95": list(r.ci95), "chance": r.chance,
            "per_category": r.per_category, "lm_seconds": r.lm_seconds, "prepare_seconds": r.prepare_seconds}


def _cell_figures(base: EvalResult, r: EvalResult, base_m: dict, m: dict) -> dict:
    pair = compare_results(base, r)
    ids = [p["id"] for p in base.predictions]
    cb = {p["id"]: p["correct"] for p in base.predictions}
    cr = {p["id"]: p["correct"] for p in r.predictions}
    ret, ret_ci = retention([cb[i] for i in ids], [cr[i] for i in ids])
    cats = {c: {**v, "retention": (v["correct"] / base.per_category[c]["correct"]
                                   if base.per_category.get(c, {}).get("correct") else None)}
            for c, v in r.per_category.items()}
    speed = (base.lm_seconds / r.lm_seconds) if base.lm_seconds and r.lm_seconds else None
    macs = (m["llm_gmacs"] / base_m["llm_gmacs"]) if m.get("llm_gmacs") and base_m.get("llm_gmacs") else None
    return {**_result_summary(r), "per_category": cats, "retention": ret,
            "retention_ci95": list(ret_ci) if ret_ci else None, "paired": pair.to_dict(),
            "kl_first_token": r.kl_first_token, "speedup": speed, "macs_ratio": macs,
            "visual_tokens": m.get("visual_tokens"), "visual_per_layer": m.get("visual_per_layer")}


def _f(x: Any, fmt: str = ".3f") -> str:
    return "–" if x is None else format(x, fmt)


def markdown(report: dict) -> str:
    """The study as a Markdown table: one row per cell, figures with their 95 % intervals."""
    lines = ["| method | keep | seed | dataset | accuracy [95%] | retention [95%] | Δ vs uncompressed [95%] | "
             "agreement | KL first token | visual tokens | MACs ratio | LM speedup |", "|" + "---|" * 12]
    for name, u in report["uncompressed"].items():
        lines.append(f"| uncompressed | 1 | | {name} | {u['accuracy']:.3f} [{u['ci95'][0]:.3f}, {u['ci95'][1]:.3f}] "
                     f"| 1 | 0 | 1 | 0 | {_f(u.get('visual_tokens'), 'd')} | 1 | 1 |")
    for c in report["cells"]:
        if c["status"] != "ok":
            lines.append(f"| {c['method']} | {c['keep']:g} | {_f(c['seed'], 'd')} | {c['dataset']} | failed: "
                         f"{c['reason'][:80]} |||||||")
            continue
        p, rc = c["paired"], c["retention_ci95"]
        ret = "–" if c["retention"] is None else f"{c['retention']:.3f} [{rc[0]:.3f}, {rc[1]:.3f}]"
        lines.append(f"| {c['method']} | {c['keep']:g} | {_f(c['seed'], 'd')} | {c['dataset']} | {c['accuracy']:.3f} "
                     f"[{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}] | {ret} | {p['difference']:+.3f} "
                     f"[{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]{'' if p['within_noise'] else ' *'} | "
                     f"{p['agreement']:.3f} | {_f(c['kl_first_token'], '.4f')} | {_f(c['visual_tokens'], 'd')} | "
                     f"{_f(c['macs_ratio'])} | {_f(c['speedup'], '.2f')} |")
    skipped = [m for m in report["methods"] if not m["runs"]]
    if skipped:
        lines += ["", "Not run on this model: " + "; ".join(f"{m['name']} ({m['reason']})" for m in skipped)]
    lines += ["", "\\* the 95 % interval of the difference excludes 0; otherwise the difference is within the noise."]
    return "\n".join(lines) + "\n"


def load_study_model(path: str, device: str | torch.device | None = None):
    """A saved CompactVLM (a model or run directory) or a transformers VLM, uncompressed, in eval mode."""
    path = resolve(path)  # the name "reference": the committed reference model
    if find_model_dir(path) is not None:
        model = CompactVLM.from_pretrained(path)
        return (model.to(device) if device else model).eval()
    vlm: CompressedVLM = load_compressed(path, None, device=device)
    return vlm

"""Evaluation: batched greedy generation over a dataset, answer normalization, exact-match (and VQA) accuracy overall
and per category, the chance level of each category, and predictions as JSONL.

Batching: samples go ``batch_size`` at a time, grouped by prompt length (less padding), one ``CompactVLM.generate``
call per batch (left padding, greedy decoding); batch size N gives the same answers as batch size 1 (tested), so
neither the grouping nor the batch size changes an answer. Files written to
``out_dir``: ``predictions.jsonl`` (one line per sample: id, question, prediction, answer, category, correct),
``metrics.json`` (the :class:`EvalResult` without predictions) and ``config.yaml`` when a config is given.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from .atomic import write_file_atomically
from .config import save_config
from .data import accuracy_report, exact_match, vqa_accuracy
from .data.collate import collate
from .device import resolve_precision
from .errors import CheckpointError, ConfigError, InputError
from .stats import PairedComparison, paired_comparison, wilson_interval

PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"


@dataclass
class EvalResult:
    dataset: str
    n: int
    correct: int
    accuracy: float  # exact match after normalization, over all samples
    per_category: dict[str, dict]  # category -> {accuracy, ci95, n, correct, chance}
    chance: float | None  # accuracy of uniform guessing, weighted by the categories' sample counts
    vqa_accuracy: float | None = None  # min(1, matches / 3) when samples carry meta["answers"]
    seconds: float = 0.0
    samples_per_s: float = 0.0  # end to end: images encoded (or read from a feature cache) + the LM
    prepare_seconds: float | None = None  # images encoded, token ops, projector, prompts built (None: not reported)
    lm_seconds: float | None = None  # the LM alone: prefill + decoding; compare methods by this
    lm_samples_per_s: float | None = None
    batch_size: int = 1
    max_new_tokens: int = 8
    precision: str = "fp32"
    skipped_records: int = 0
    ci95: tuple[float, float] = (0.0, 1.0)  # Wilson score interval of the accuracy (compactvl.stats)
    # mean KL(reference || this run) of the first answer token's distribution, when a reference run was given
    kl_first_token: float | None = None
    predictions: list[dict] = field(default_factory=list, repr=False)
    first_logprobs: dict[str, Any] | None = field(default=None, repr=False)  # id -> [V] log-probs (not saved)

    def to_dict(self, with_predictions: bool = False) -> dict:
        d = asdict(self)
        d.pop("first_logprobs")
        if not with_predictions:
            d.pop("predictions")
        return d


def chance_levels(dataset: Dataset, categories: Sequence[str]) -> dict[str, float]:
    """Per-category chance level when the dataset defines one (synthvqa, easy-vqa); empty otherwise."""
    parts = getattr(dataset, "datasets", [dataset])
    for d in parts:
        fn = getattr(d, "chance_level", None)
        if fn is not None:
            out = {}
            for c in categories:
                try:
                    out[c] = float(fn(c))
                except Exception:  # noqa: BLE001 - a category the set does not define has no chance level
                    pass
            return out
    return {}


@torch.no_grad()
def predict(model, samples: Sequence, batch_size: int = 16, max_new_tokens: int = 8) -> list[str]:
    """Greedy answers for samples, ``batch_size`` per generate call, in order."""
    if batch_size < 1:
        raise ConfigError(f"eval batch_size must be >= 1, got {batch_size}")
    out: list[str] = []
    for i in range(0, len(samples), batch_size):
        b = collate(samples[i:i + batch_size], for_generation=True)
        out += model.generate(b.conversations, b.images, max_new_tokens=max_new_tokens)
    return out


def _by_prompt_length(model, dataset: Dataset, n: int) -> list[int]:
    """Indices 0..n-1 ordered by prompt length in tokens (ties by index) for a CompactVLM; dataset order for models
    without compactvl's processor (compressed transformers VLMs), whose prompts are not measured here."""
    encode = getattr(getattr(model, "processor", None), "encode_conversation", None)  # compactvl's Processor
    if not callable(encode):
        return list(range(n))
    lengths = [len(encode(collate([dataset[i]], for_generation=True).conversations[0]).ids) for i in range(n)]
    return sorted(range(n), key=lambda i: (lengths[i], i))


def eval_set_name(spec: dict) -> str:
    """The label of an evaluation set in tables, charts and results: ``synthvqa-test``, with the clutter when it is
    not the set's default (``synthvqa-test-distractors0``, ``...-distractors1-2``), or a LLaVA file's stem."""
    if str(spec["name"]).endswith((".json", ".jsonl")):
        return Path(spec["name"]).stem
    d = spec.get("distractors")
    if d is None:
        return f"{spec['name']}-{spec['split']}"
    lo, hi = (d, d) if isinstance(d, int) else (d[0], d[-1])
    return f"{spec['name']}-{spec['split']}-distractors{lo}" + (f"-{hi}" if hi != lo else "")


def evaluate(model, dataset: Dataset, batch_size: int = 16, max_new_tokens: int = 8,
             out_dir: str | os.PathLike | None = None, name: str | None = None, config: dict | None = None,
             progress: bool = False, limit: int | None = None, precision: str = "fp32",
             sort_by_length: bool = True, keep_first_logprobs: bool = False,
             reference: EvalResult | None = None) -> EvalResult:
    """Generate answers for every sample of ``dataset`` and score them; write files when ``out_dir`` is given.
    ``precision``: fp32, bf16 or auto (bf16 autocast where ``compactvl.device.resolve_precision`` picks it).
    ``sort_by_length``: batch samples of similar prompt length together (less padding; the answers do not change,
    since batch-N equals batch-1); predictions are reported in dataset order either way.
    ``keep_first_logprobs``: keep each item's first-answer-token log-probs (``EvalResult.first_logprobs``, in
    memory only) to serve as the ``reference`` of later runs. With ``reference`` (a run of the same model on the
    same items, e.g. uncompressed), each prediction row gets ``kl_first_token`` = KL(reference || this run) of
    that distribution, a label-free divergence, and ``EvalResult.kl_first_token`` their mean."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n == 0:
        raise InputError("the evaluation set is empty; check the dataset name, split and n")
    if getattr(dataset, "task", None) == "describe":
        raise InputError("synthvqa's describe task cannot be scored by exact match (its answer is a whole "
                         "description); train on it and evaluate on the vqa task")
    out_path = Path(out_dir) if out_dir is not None else None
    if out_path is not None:
        _check_writable(out_path)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
    amp = resolve_precision(precision, device)
    slots: list[tuple[str, str | list[str], dict] | None] = [None] * n
    timings: dict[str, float] | None = {"prepare_s": 0.0, "lm_s": 0.0}
    kept_lp: dict[str, Any] = {}
    kl: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        order = _by_prompt_length(model, dataset, n) if sort_by_length else list(range(n))
        with tqdm(total=n, disable=not progress, desc=f"eval {name or ''}".strip(), unit="sample") as bar:
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                samples = [dataset[i] for i in idx]
                with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    answers = predict(model, samples, batch_size=len(samples), max_new_tokens=max_new_tokens)
                lp = getattr(model, "last_first_logprobs", None)
                if lp is not None and (keep_first_logprobs or reference is not None):
                    for k, s in enumerate(samples):
                        dist = lp[k].detach().float().cpu()
                        if keep_first_logprobs:
                            kept_lp[s.id] = dist
                        ref = (reference.first_logprobs or {}).get(s.id) if reference is not None else None
                        if ref is not None and ref.shape == dist.shape:
                            kl[s.id] = max(0.0, float((ref.exp() * (ref - dist)).sum()))
                timing = getattr(model, "last_timing", None)
                if timing is not None and timings is not None:
                    timings["prepare_s"] += timing["prepare_s"]
                    timings["lm_s"] += timing["lm_s"]
                else:
                    timings = None  # a model that does not report its split
                for i, s, p in zip(idx, samples, answers):
                    if s.answer is None:
                        raise InputError(f"sample {s.id} has no answer to score against; end its conversation "
                                         "with the gpt answer")
                    golds = s.meta.get("answers") if isinstance(s.meta.get("answers"), list) else None
                    slots[i] = (p, golds or s.answer, {
                        "id": s.id, "question": s.question, "prediction": p, "answer": s.answer,
                        "category": s.category, "correct": exact_match(p, golds or s.answer),
                        **({"vqa_accuracy": vqa_accuracy(p, golds)} if golds else {}),
                        **({"kl_first_token": kl[s.id]} if s.id in kl else {})})
                bar.update(len(samples))
    finally:
        model.train(was_training)
    preds = [x[0] for x in slots]
    golds_all = [x[1] for x in slots]
    rows = [x[2] for x in slots]
    seconds = time.perf_counter() - t0
    report = accuracy_report(preds, golds_all, [r["category"] for r in rows])
    chance = chance_levels(dataset, list(report["per_category"]))
    per = {c: {**v, "ci95": list(wilson_interval(v["correct"], v["n"])), "chance": chance.get(c)}
           for c, v in report["per_category"].items()}
    overall_chance = (sum(chance[c] * v["n"] for c, v in per.items()) / sum(v["n"] for v in per.values())
                      if per and all(c in chance for c in per) and sum(v["n"] for v in per.values()) == n else None)
    vqa = [r["vqa_accuracy"] for r in rows if "vqa_accuracy" in r]
    res = EvalResult(dataset=name or type(dataset).__name__, n=n, correct=report["correct"],
                     accuracy=report["overall"], per_category=per, chance=overall_chance,
                     vqa_accuracy=sum(vqa) / len(vqa) if vqa else None, seconds=seconds,
                     samples_per_s=n / seconds if seconds > 0 else 0.0, batch_size=batch_size,
                     prepare_seconds=timings["prepare_s"] if timings else None,
                     lm_seconds=timings["lm_s"] if timings else None,
                     lm_samples_per_s=n / timings["lm_s"] if timings and timings["lm_s"] > 0 else None,
                     max_new_tokens=max_new_tokens, precision="bf16" if amp is not None else "fp32",
                     skipped_records=len(getattr(dataset, "skipped", []) or []),
                     ci95=wilson_interval(report["correct"], n),
                     kl_first_token=sum(kl.values()) / len(kl) if kl else None,
                     first_logprobs=kept_lp or None,
                     predictions=rows)
    if out_path is not None:
        write_results(res, out_path, config)
    return res


def _check_writable(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write evaluation results to {path} ({e.strerror or e}); choose a writable "
                          "output directory") from None


def write_results(res: EvalResult, out_dir: str | os.PathLike, config: dict | None = None) -> Path:
    """``predictions.jsonl`` + ``metrics.json`` (+ ``config.yaml``) into ``out_dir``, each via temp + rename."""
    out = Path(out_dir)
    _check_writable(out)
    _write_text(out / PREDICTIONS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in res.predictions))
    _write_text(out / METRICS, json.dumps(res.to_dict(), indent=1))
    if config is not None:
        save_config(config, out)
    return out


def read_results(out_dir: str | os.PathLike) -> EvalResult:
    """The EvalResult ``write_results`` wrote into ``out_dir``, predictions included (to compare runs later)."""
    out = Path(out_dir)
    try:
        d = json.loads((out / METRICS).read_text())
        rows = [json.loads(line) for line in (out / PREDICTIONS).read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the evaluation results in {out} ({e}); evaluate again") from None
    d["ci95"] = tuple(d["ci95"])
    return EvalResult(**d, predictions=rows)


def _write_text(path: Path, text: str) -> None:
    try:
        write_file_atomically(path, text)
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror or e}; choose a writable output directory") from None


def compare_results(base: EvalResult, other: EvalResult) -> PairedComparison:
    """``other`` against ``base`` on the same items (matched by sample id): the accuracy difference with its 95 %
    paired bootstrap interval, McNemar's p and the agreement of the answers (``compactvl.stats``)."""
    a = {r["id"]: r for r in base.predictions}
    b = {r["id"]: r for r in other.predictions}
    if not a or set(a) != set(b):
        raise InputError(f"{base.dataset} and {other.dataset} were not scored on the same items ({len(a)} and "
                         f"{len(b)} ids); compare runs over the same evaluation set")
    ids = [r["id"] for r in base.predictions]
    return paired_comparison([a[i]["correct"] for i in ids], [b[i]["correct"] for i in ids],
                             [a[i]["prediction"] for i in ids], [b[i]["prediction"] for i in ids])


def format_table(results: Sequence[EvalResult], title: str | None = None) -> str:
    """A plain-text table: one row per (dataset, category) plus overall rows, with chance levels, then each set's
    time split: the LM alone (prefill + decoding; compare methods by this) and preparing the inputs (encoding)."""
    lines = [title] if title else []
    w = max([7] + [len(r.dataset) for r in results])
    lines.append(f"{'dataset':<{w}} {'category':<10} {'n':>5} {'accuracy':>9} {'95% interval':>14} {'chance':>7}")
    for r in results:
        for c, v in r.per_category.items():
            ch = "" if v.get("chance") is None else f"{v['chance']:.3f}"
            lo, hi = v.get("ci95") or wilson_interval(v["correct"], v["n"])
            lines.append(f"{r.dataset:<{w}} {c:<10} {v['n']:>5} {v['accuracy']:>9.3f} {f'[{lo:.3f}, {hi:.3f}]':>14} "
                         f"{ch:>7}")
        ch = "" if r.chance is None else f"{r.chance:.3f}"
        lo, hi = r.ci95
        lines.append(f"{r.dataset:<{w}} {'OVERALL':<10} {r.n:>5} {r.accuracy:>9.3f} {f'[{lo:.3f}, {hi:.3f}]':>14} "
                     f"{ch:>7}")
    for r in results:
        if r.lm_seconds is not None:
            lines.append(f"{r.dataset}: LM {r.lm_seconds:.1f} s ({r.lm_samples_per_s or 0:.2f} samples/s), preparing "
                         f"the inputs (image encoding, token ops) {r.prepare_seconds:.1f} s, total {r.seconds:.1f} s")
    return "\n".join(lines)

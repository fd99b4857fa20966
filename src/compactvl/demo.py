"""The demo: train a small VLM from real pretrained parts on a CPU, then show what it learned and what token
compression costs — with numbers measured on the spot.

    compactvl demo              # SmolLM2-135M-Instruct + DINOv2-S, packaged recipe `demo` (9 min on a Xeon with AMX,
                                # 33 min on an AMD EPYC in fp32: README)
    compactvl demo --quick      # the same code path with tiny random parts (seconds; numbers are meaningless)

Steps: build the model from the recipe → train (``compactvl.train.Trainer``, encoder features cached) → export →
reload the exported model and evaluate it on every ``data.eval`` set, as trained and under each ``eval.variants``
entry (other token ops or layer policies applied to the same trained weights, e.g. fewer visual tokens) → print a
table with the chance level of every category, and write ``results.json`` (schema in docs/training.md) and
``accuracy.png`` into the output directory.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .atomic import write_file_atomically
from .config import load_config, save_config
from .device import default_device
from .encoders import tiny_encoder
from .errors import ConfigError
from .evaluate import EvalResult, compare_results, eval_set_name, evaluate, format_table
from .hardware import has_amx, loadavg, machine
from .measure.counted import measured_schedule
from .model import CompactVLM
from .ops import build_ops
from .plots import accuracy_bars
from .policies import build_policy
from .testing import tiny_lm, tiny_tokenizer
from .train import FeatureCache, Trainer, build_dataset, build_model, build_train_data

RESULTS = "results.json"
CHART = "accuracy.png"
SCHEMA_VERSION = 1
QUICK_RECIPE = {
    "model": {"lm": "tiny-llama (compactvl.testing.tiny_lm)", "encoders": ["tiny-dinov2 (compactvl.encoders.tiny)"],
              "token_ops": [{"op": "avgpool", "k": 2}], "system_prompt": ""},
    "data": {"train": [{"name": "synthvqa", "n": 32}],
             "eval": [{"name": "synthvqa", "split": "test", "n": 10}]},
    "train": {"stage": "sft", "lr": 3e-3, "batch_size": 8, "max_steps": 4, "warmup_steps": 1, "precision": "fp32"},
    "eval": {"batch_size": 4, "max_new_tokens": 3,
             "variants": [{"name": "avgpool k=4", "token_ops": [{"op": "avgpool", "k": 4}]}]},
    "output_dir": "runs/demo-quick",
}
VARIANT_KEYS = {"name", "token_ops", "policies", "position_policy"}  # experts change weights: not a variant


@dataclass
class VariantResult:
    method: str  # "as trained" or the eval.variants entry's name
    spec: dict  # the config fields the variant replaced
    measured: dict  # measured_schedule(): visual tokens, tokens per layer, LLM GMACs
    results: list[EvalResult]  # one per data.eval set
    paired: list[dict | None] = field(default_factory=list)  # per set: against "as trained" (compactvl.stats)


REAL_PATCH = {"dinov2": 14, "efficientnet": 16, "clip": 14, "siglip": 16}  # px per token of the real encoders
TINY_PATCH = 8  # px per token of every tiny encoder


def tiny_model(cfg: dict, image_size: int | None = 32):
    """The quick demo's model: a tiny random LM and tokenizer, and one tiny encoder per recipe encoder (EfficientNet-
    style for efficientnet encoders, DINOv2-style otherwise; ``image_size`` px, or with ``None`` the size that gives
    the real encoder's patch grid, so token counts equal the real model's) with the recipe's ops, projector,
    policies and experts. The tiny encoders have 3 blocks, so MBTF fuses all of them."""
    m = cfg["model"]
    encoders = []
    for i, e in enumerate(m["encoders"]):
        name = e["name"] if isinstance(e, dict) else str(e)
        kind = "efficientnet" if "efficientnet" in name else "dinov2"
        size = image_size
        if size is None:
            real = next((v for k, v in REAL_PATCH.items() if k in name), 14)
            size = (e.get("image_size", 224) if isinstance(e, dict) else 224) // real * TINY_PATCH
        encoders.append(tiny_encoder(kind, size, seed=i))
    ops = [{**o, "count": min(o.get("count", 8), 3), "every": 1} if o["op"] == "mbtf" else o for o in m["token_ops"]]
    return CompactVLM.build(lm=tiny_lm(), encoders=encoders, tokenizer=tiny_tokenizer(),
                            token_ops=ops, projector=m["projector"], policies=m["policies"],
                            experts=m["experts"],
                            position_policy=m["position_policy"], seed=cfg["train"]["seed"],
                            system_prompt=m["system_prompt"])


# ---------------------------------------------------------------- measuring a variant
def check_variants(cfg: dict, model=None) -> list[dict]:
    """The ``eval.variants`` entries, checked — before training, so a typo does not cost a training run: known keys
    and a name; with ``model``, each variant's token ops build for the model's encoders and hand its projector the
    channel width it is trained on, and its policies build."""
    variants = [dict(v) for v in cfg["eval"]["variants"]]
    for v in variants:
        bad = sorted(set(v) - VARIANT_KEYS)
        if bad or not isinstance(v.get("name"), str):
            raise ConfigError(f"eval.variants entry {v} has unknown keys {bad} or no 'name'; a variant is "
                              f"{{name: ..., token_ops: [...], policies: [...], position_policy: ...}}")
        if model is None:
            continue
        try:
            if "token_ops" in v:
                widths, trained = model.token_ops.in_channels, model.token_ops.out_channels
                got = build_ops(v["token_ops"], widths).out_channels
                if got != trained:
                    raise ConfigError(f"its token ops give the projector {got} channels, but it is trained on "
                                      f"{trained}; keep the trained ops and append the reduction")
            for p in v.get("policies", []):
                build_policy(p)
        except ConfigError as e:
            raise ConfigError(f"eval.variants entry '{v['name']}': {e}") from None
    return variants


def evaluate_variants(model_dir: str | os.PathLike, cfg: dict, out_dir: str | os.PathLike, progress: bool = True,
                      log: Callable[[str], None] = print) -> list[VariantResult]:
    """Evaluate the saved model on every ``data.eval`` set as trained and under each ``eval.variants`` entry. The
    model is read once and each variant swaps its token ops / policies (``CompactVLM.variant``: the same weights as
    ``from_pretrained(model_dir, **variant)``); encoder features are cached across variants (same images)."""
    variants = [{"name": "as trained"}] + check_variants(cfg)
    sets = [(eval_set_name(s), build_dataset(s)) for s in cfg["data"]["eval"]]
    if not sets:
        raise ConfigError("data.eval is empty; name at least one evaluation set (e.g. {name: synthvqa, split: test})")
    model = CompactVLM.from_pretrained(model_dir).to(default_device())  # read once; variants swap ops and policies
    FeatureCache().attach(model)  # the encoder runs once per image for all variants
    rows = []
    for v in variants:
        over = {k: v[k] for k in v if k != "name"}
        with model.variant(**over):
            measured = measured_schedule(model, sets[0][1][0])
            results = []
            for k, (name, ds) in enumerate(sets):
                sub = Path(out_dir) / _slug(v["name"]) / name
                r = evaluate(model, ds, cfg["eval"]["batch_size"], cfg["eval"]["max_new_tokens"], out_dir=sub,
                             name=name, config=cfg, progress=progress, precision=cfg["eval"]["precision"],
                             keep_first_logprobs=not rows, reference=rows[0].results[k] if rows else None)
                results.append(r)
                log(f"{v['name']:>24} | {name}: accuracy {r.accuracy:.3f} [{r.ci95[0]:.3f}, {r.ci95[1]:.3f}] (chance "
                    f"{_fmt(r.chance)}), {measured['visual_tokens']} visual tokens, LM {r.lm_samples_per_s or 0:.1f} "
                    f"samples/s")
        paired = [{**compare_results(base, r).to_dict(), "kl_first_token": r.kl_first_token}
                  for base, r in zip(rows[0].results, results)] if rows else []
        for (name, _), p in zip(sets, paired):
            kl = "" if p["kl_first_token"] is None else f", KL(first answer token) {p['kl_first_token']:.4f}"
            log(f"{'':>24} | {name} vs as trained: {p['difference']:+.3f} [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]"
                f" ({'within the noise' if p['within_noise'] else 'outside the noise'}), agreement "
                f"{p['agreement']:.3f}{kl}")
        rows.append(VariantResult(v["name"], over, measured, results, paired))
    for r in rows[0].results:
        r.first_logprobs = None  # the reference distributions served the variants; free them
    del model
    gc.collect()
    return rows


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("_") or "variant"


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


# ---------------------------------------------------------------- report
def summary_table(rows: Sequence[VariantResult]) -> str:
    """Overall accuracy per method and dataset, with visual tokens, LLM GMACs and chance."""
    names = [r.dataset for r in rows[0].results]
    head = f"{'method':<26} {'visual tok':>10} {'LLM GMACs':>10} " + " ".join(f"{n:>16}" for n in names)
    lines = [head, "-" * len(head)]
    for v in rows:
        m = v.measured
        lines.append(f"{v.method:<26} {m['visual_tokens']:>10} {m['llm_gmacs']:>10.3g} "
                     + " ".join(f"{r.accuracy:>16.3f}" for r in v.results))
    lines.append(f"{'chance':<26} {'':>10} {'':>10} " + " ".join(f"{_fmt(r.chance):>16}" for r in rows[0].results))
    return "\n".join(lines)


EVAL_COST = 0.4  # an evaluation sample costs about this share of a training sample (forward only, fewer tokens;
# measured on the packaged demo: 0.37 on an AMD EPYC, fp32)


def _eta_printer(t_start: float, eval_samples: int, n_variants: int, log: Callable[[str], None]):
    """A Trainer ``on_step`` callback: after the fourth step, print the expected duration — the training steps left
    at the median pace of steps 2-4 (the first warms up), and the evaluation estimated from it (``EVAL_COST``) plus
    encoding the evaluation images at the rate the training images were encoded."""
    times: list[float] = []

    def on_step(trainer, seconds: float) -> None:
        times.append(seconds)
        if trainer.step != min(4, trainer.total_steps):
            return
        pace = sorted(times[1:] or times)[len(times[1:] or times) // 2]
        per_sample = pace / trainer.t["batch_size"]
        train_left = (trainer.total_steps - trainer.step) * pace
        encode = eval_samples * (trainer.encode_seconds_per_image or 0.0)
        evaluation = encode + eval_samples * n_variants * per_sample * EVAL_COST
        total = time.perf_counter() - t_start + train_left + evaluation
        log(f"expected: training {train_left:.0f}s more ({trainer.total_steps - trainer.step} steps at "
            f"{pace:.1f}s), evaluation ~{evaluation:.0f}s ({n_variants} variant(s) x {eval_samples} samples); "
            f"total ~{total / 60:.1f} min on this machine")

    return on_step


class _Clock:
    """``with clock("train"):`` records wall seconds (``train_s``) and CPU seconds of this process (``train_cpu_s``;
    on a machine shared with other work, CPU seconds / threads estimates the wall time it would take alone)."""

    def __init__(self, out: dict[str, float]):
        self.out = out

    @contextlib.contextmanager
    def __call__(self, name: str):
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.out[f"{name}_s"] = time.perf_counter() - w
            self.out[f"{name}_cpu_s"] = time.process_time() - c


# ---------------------------------------------------------------- the demo
@dataclass
class SharedCaches:
    """Encoder features of the training images, shared by runs made one after another (``compactvl demo
    --compare``): a run reads what an earlier run on the same encoder (config and weights) encoded instead of
    encoding it again. A cache is shared only between runs whose training precision, seed, batch and data are equal,
    so each image was encoded in the same chunk and precision as the run would have encoded it itself (a chunk's
    composition can change a convolutional encoder's last bits). Evaluation images are not shared: their batches
    follow each model's prompt lengths."""
    caches: dict[str, FeatureCache] = field(default_factory=dict)

    def train(self, cfg: dict) -> FeatureCache:
        """The cache for ``cfg``'s training run; one for another context replaces it (memory stays one run's)."""
        t = cfg["train"]
        key = json.dumps([t["precision"], t["seed"], t["batch_size"], t["micro_batch_size"], cfg["data"]["train"]],
                         sort_keys=True, default=str)
        if key not in self.caches:
            self.caches.clear()
        return self.caches.setdefault(key, FeatureCache())


def run_demo(cfg: dict, out_dir: str | os.PathLike | None = None, quick: bool = False, progress: bool = True,
             log: Callable[[str], None] = print, command: str | None = None, tiny_size: int | None = 32,
             rows_out: list | None = None, resume: bool = False, shared: SharedCaches | None = None) -> dict:
    """Train, evaluate, compare variants, and write results.json + accuracy.png; returns the results dict
    (``rows_out`` receives the VariantResult rows; ``tiny_size``: the quick run's encoder resolution, see
    ``tiny_model``; ``resume``: continue the training from its last checkpoint instead of starting over;
    ``shared``: encoder features shared with the runs before it, see :class:`SharedCaches`)."""
    t_start, cpu_start = time.perf_counter(), time.process_time()
    load_start = loadavg()
    out = Path(out_dir or cfg["output_dir"])
    cfg["output_dir"] = str(out)
    if cfg["train"]["num_threads"]:
        torch.set_num_threads(cfg["train"]["num_threads"])
    timings: dict[str, float] = {}
    clock = _Clock(timings)
    with clock("load"):
        model = (tiny_model(cfg, tiny_size) if quick else build_model(cfg)).to(default_device())
        data = build_train_data(cfg["data"]["train"], model=model)
        check_variants(cfg, model)
        cache = shared.train(cfg) if shared is not None else None
        if cache is not None:
            cache.retain(model)  # keep only the entries of this model's encoders: memory stays one run's
    eval_samples = sum(int(spec.get("n") or 0) for spec in cfg["data"]["eval"])
    n_variants = 1 + len(cfg["eval"]["variants"])
    trainer = Trainer(model, data, cfg, output_dir=out / "train", progress=progress, log=log,
                      on_step=_eta_printer(t_start, eval_samples, n_variants, log),
                      feature_cache=cache)
    host = machine()
    why = "" if trainer.autocast is not None or trainer.device.type != "cpu" else (
        " (this CPU has no AMX, where bf16 would be fast)" if not has_amx() else " (train.precision: fp32)")
    log(f"machine: {host['gpu'] or host['cpu']}, {host['cpu_count']} cores, {torch.get_num_threads()} threads; "
        f"precision {'bf16 autocast' if trainer.autocast is not None else 'fp32'}{why}; the expected duration "
        f"follows the first training steps")
    with clock("train"):  # includes encoding the training images once (feature cache)
        tr = trainer.fit(resume=resume, overwrite=not resume)  # the demo retrains from scratch unless resuming
    if tr.interrupted:
        log(f"the demo retrains from scratch on every run (its checkpoint is in {out / 'train'}); run it again to "
            f"start over")
        raise KeyboardInterrupt
    precision = "bf16" if trainer.autocast is not None else "fp32"
    del trainer, model, cache
    gc.collect()
    with clock("eval"):
        rows = evaluate_variants(tr.model_dir, cfg, out / "eval", progress=progress, log=log)
    timings["total_s"] = time.perf_counter() - t_start
    timings["total_cpu_s"] = time.process_time() - cpu_start
    host = {**machine(), "load_average_start": load_start, "load_average_end": loadavg()}
    table = summary_table(rows)
    details = "\n\n".join(format_table(v.results, title=f"== {v.method}") for v in rows)
    encs = [e if isinstance(e, str) else f"{e['name']}" + (f"@{e['image_size']}px" if "image_size" in e else "")
            for e in cfg["model"]["encoders"]]
    title = (f"compactvl demo{' --quick (tiny random parts)' if quick else ''}: {cfg['model']['lm']} + "
             f"{', '.join(encs)}, {cfg['train']['stage']}, {tr.steps} steps x {cfg['train']['batch_size']}")
    chart = accuracy_bars(rows, out / CHART, title)
    results = {
        "schema_version": SCHEMA_VERSION,
        "quick": quick,
        "command": command or " ".join(["compactvl", "demo", *sys.argv[2:]]),
        "machine": host,  # load averages: other work on the machine slows the wall-clock figures
        "train": {"steps": tr.steps, "samples": tr.steps * cfg["train"]["batch_size"], "first_loss": tr.losses[0],
                  "final_loss": tr.losses[-1], "losses": tr.losses, "samples_per_s": tr.samples_per_s,
                  "aux_losses": tr.aux_losses,  # the auxiliary part of each loss (balance, SIP); None: unrecorded
                  "precision": precision, "model_dir": str(tr.model_dir), "skipped_records": tr.skipped_records,
                  "feature_cache": tr.cache},  # images, hits, misses, seconds spent encoding (train_s includes them)
        "results": [{"method": v.method, "variant": v.spec, "dataset": r.dataset, **v.measured, "n": r.n,
                     "correct": r.correct, "accuracy": r.accuracy, "ci95": list(r.ci95), "chance": r.chance,
                     "per_category": r.per_category, "samples_per_s": r.samples_per_s,
                     "lm_samples_per_s": r.lm_samples_per_s,
                     "paired_vs_as_trained": v.paired[i] if i < len(v.paired) else None}
                    for v in rows for i, r in enumerate(v.results)],
        "timings": timings,
        "chart": CHART,
        "config": cfg,
    }
    write_file_atomically(out / RESULTS, json.dumps(results, indent=1, default=str))
    save_config(cfg, out)
    if rows_out is not None:
        rows_out.extend(rows)
    log("\n" + details + "\n\n" + table)
    log(f"\ntrain {timings['train_s']:.0f}s, eval {timings['eval_s']:.0f}s, total {timings['total_s']:.0f}s wall "
        f"({timings['total_cpu_s']:.0f} CPU-seconds; {precision}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} cores)")
    log(f"wrote {out / RESULTS} and {chart}")
    log(f"the trained model is in {tr.model_dir}; next:\n" + next_commands(out, cfg))
    return results


def next_commands(out: Path, cfg: dict) -> str:
    """What to try after the demo, on data like the training data: the first synthvqa eval scene is saved as
    ``out/sample.png`` (with the recipe's clutter, e.g. distractors 0) and the chat command asks its question."""
    lines = []
    spec = next((s for s in cfg["data"]["eval"] if s["name"] == "synthvqa"), None)
    if spec is not None:
        sample = build_dataset({**spec, "n": 1})[0]
        sample.images[0].save(out / "sample.png")
        lines.append(f"  compactvl chat --model {out} --image {out / 'sample.png'} --prompt {json.dumps(sample.question)}"
                     f"   # answer: {sample.answer}; a scene like those it trained on ({eval_set_name(spec)})")
    lines += [f"  compactvl eval {out} --n 500", f"  compactvl bench --model {out} --visual 16 --method vanilla "
                                                    f"--method keep:0.5"]
    return "\n".join(lines)


def demo_config(quick: bool, overrides: Sequence[str] = (), recipe: str | None = None) -> dict:
    """The demo's resolved config: the packaged recipe ``demo`` (or ``recipe``), or the quick one, + overrides."""
    if quick:
        return load_config(json.loads(json.dumps(QUICK_RECIPE)), overrides)
    return load_config(recipe or "demo", overrides)


def main_args(quick: bool, out: str | None, overrides: Sequence[str], recipe: str | None = None,
              progress: bool = True) -> dict[str, Any]:
    cfg = demo_config(quick, overrides, recipe)
    return run_demo(cfg, out, quick=quick, progress=progress)

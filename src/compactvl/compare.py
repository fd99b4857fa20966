"""``compactvl demo --compare``: trained systems side by side, at equal visual tokens and an equal training budget.

    compactvl demo --compare systems [--budget 16] [--only a,b] [--check] [--quick]   # a packaged suite
    compactvl demo --compare venvl,leomini,llava_stf [--unequal]                       # recipes as named

A **suite** (``recipes/compare/NAME.yaml`` or a path) names a baseline, the sections every system shares (``common``:
the same data, steps, batch, stage and evaluation; ``cuda``: a larger budget used instead when the device is CUDA),
and, per budget of visual tokens entering the LM, the systems: each a recipe plus changes to its ``model`` section.
Recipes named on the command line form a suite of one budget whose baseline is the first.

Before anything trains, every system's model is built (tiny random parts with ``--quick``, on the same patch grids)
and the visual tokens entering its LM are measured on one evaluation sample. A system whose count differs from its
budget (or, for named recipes, from the others'), or whose data, steps or stage differ, is refused, naming the
difference (``--unequal`` accepts named recipes as they are). ``--check`` stops there and prints the plan.

Each system is a full demo run in ``OUT/<budget>/<system>`` and is resumable: a finished run with the same resolved
config is reused, an interrupted one resumes from its last checkpoint (``train.save_every``). Every system is
compared with the baseline on the same items (paired bootstrap interval and McNemar's p, ``compactvl.stats``).
``compare.json``, ``compare.md``, ``compare.png`` (accuracy with intervals) and ``curves.png`` (training loss per
step) go into ``OUT``, rewritten after each system.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .atomic import write_file_atomically
from .config import CONFIG_FILE, RECIPE_DIR, load_config, read_yaml, with_current_defaults
from .demo import QUICK_RECIPE, RESULTS, SharedCaches, VariantResult, run_demo, tiny_model
from .device import default_device
from .errors import ConfigError
from .evaluate import compare_results, eval_set_name, read_results
from .hardware import machine
from .measure.counted import measured_schedule
from .plots import accuracy_bars, loss_curves
from .registry import POLICIES, TOKEN_OPS
from .train import build_dataset, build_model, list_checkpoints
from .train.checkpoint import config_diff

SUITE_DIR = RECIPE_DIR / "compare"
COMPARE = "compare.json"
TABLE = "compare.md"
CHART = "compare.png"
CURVES = "curves.png"
SUITE_KEYS = {"name", "description", "baseline", "common", "cuda", "budgets"}
SYSTEM_KEYS = {"name", "recipe", "model"}
SHARED = ("data.train", "data.eval", "train.stage", "train.batch_size", "train.epochs", "train.max_steps")


@dataclass
class System:
    budget: str  # the budget's label: its visual tokens ("16"), or "as named"
    name: str
    recipe: str
    cfg: dict
    tokens: int | None = None  # measured visual tokens entering the LM
    llm_gmacs: float | None = None

    @property
    def key(self) -> str:
        return f"{self.budget}/{self.name}"


# ---------------------------------------------------------------- suites
def list_suites() -> list[str]:
    return sorted(p.stem for p in SUITE_DIR.glob("*.yaml"))


def is_suite(spec: str) -> bool:
    """A suite name (``systems``) or a suite file; anything else is a comma-separated list of recipes."""
    if "," in spec:
        return False
    p = Path(spec)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return "budgets" in read_yaml(p)
    return p.suffix == "" and len(p.parts) == 1 and (SUITE_DIR / f"{spec}.yaml").is_file()


def read_suite(spec: str) -> dict:
    path = Path(spec) if Path(spec).suffix in (".yaml", ".yml") else SUITE_DIR / f"{spec}.yaml"
    if not path.is_file():
        raise ConfigError(f"no comparison suite {spec!r}; packaged suites: {', '.join(list_suites()) or '(none)'}, "
                          "or pass a .yaml path, or name recipes: --compare venvl,leomini")
    suite = read_yaml(path)
    bad = sorted(set(suite) - SUITE_KEYS)
    if bad or not isinstance(suite.get("budgets"), dict) or not suite["budgets"]:
        raise ConfigError(f"{path}: a suite has {', '.join(sorted(SUITE_KEYS))} with at least one budget under "
                          f"`budgets` (unknown keys: {bad or 'none'})")
    for label, systems in suite["budgets"].items():
        names = [s.get("name") for s in systems or [] if isinstance(s, dict)]
        for s in systems or []:
            extra = sorted(set(s) - SYSTEM_KEYS) if isinstance(s, dict) else ["(not a mapping)"]
            if extra or not s.get("name") or not s.get("recipe"):
                raise ConfigError(f"{path}: budget {label}: system {s} needs `name` and `recipe` (and optionally "
                                  f"`model`); unknown keys {extra}")
        if len(set(names)) != len(names) or not names:
            raise ConfigError(f"{path}: budget {label} names no systems, or one twice: {names}")
        if suite.get("baseline") not in names:
            raise ConfigError(f"{path}: budget {label} lacks the baseline {suite.get('baseline')!r}; every budget "
                              "compares its systems with it")
    return suite


def resolve_suite(suite: dict, quick: bool, overrides: Sequence[str], budgets: Sequence[str] = (),
                  only: Sequence[str] = (), cuda: bool = False) -> list[System]:
    """The systems to run, each with its resolved config: recipe <- ``common`` (``cuda`` on CUDA) <- its ``model``
    changes <- the command-line overrides (or the quick budget)."""
    shared = suite.get("cuda") if cuda and suite.get("cuda") else suite.get("common") or {}
    labels = [str(b) for b in suite["budgets"]]
    unknown = sorted(set(budgets) - set(labels))
    if unknown:
        raise ConfigError(f"no budget {', '.join(unknown)} in suite {suite.get('name')!r}; it has {', '.join(labels)}")
    systems = []
    for label, entries in suite["budgets"].items():
        if budgets and str(label) not in budgets:
            continue
        for s in entries:
            if only and s["name"] not in only and s["name"] != suite["baseline"]:
                continue  # the baseline always runs: every row is compared with it
            base = load_config(s["recipe"])
            raw = {**base, **{k: ({**base[k], **v} if isinstance(v, dict) else v) for k, v in shared.items()}}
            raw["model"] = {**raw["model"], **(s.get("model") or {})}
            cfg = _quick(raw, overrides) if quick else load_config(raw, overrides)
            cfg["eval"]["variants"] = []  # systems are compared as trained
            systems.append(System(str(label), s["name"], s["recipe"], cfg))
    missing = sorted(set(only) - {s.name for s in systems})
    if missing:
        raise ConfigError(f"--only names systems the suite does not have: {', '.join(missing)}")
    _check_distinct(systems)
    return systems


def _canonical(cfg: dict) -> str:
    """What a system trains and evaluates, with every token op and layer policy under its registered name (so
    ``token_concat``, pixel shuffle's other name, is ``pixel_shuffle``), without where it is written."""
    model = dict(cfg["model"])
    model["token_ops"] = [{**o, "op": TOKEN_OPS.canonical(o["op"])} if o.get("op") in TOKEN_OPS else o
                          for o in model.get("token_ops") or []]
    model["policies"] = [{**p, "policy": POLICIES.canonical(p["policy"])} if p.get("policy") in POLICIES else p
                         for p in model.get("policies") or []]
    return json.dumps({k: v for k, v in {**cfg, "model": model}.items() if k != "output_dir"}, sort_keys=True,
                      default=str)


def _check_distinct(systems: Sequence[System]) -> None:
    """Refuse two systems of one budget that are the same experiment (same model, training and data once names are
    resolved): they would train identical weights twice and report one result as two."""
    for label in dict.fromkeys(s.budget for s in systems):
        seen: dict[str, str] = {}
        for s in (s for s in systems if s.budget == label):
            twin = seen.setdefault(_canonical(s.cfg), s.name)
            if twin != s.name:
                raise ConfigError(f"budget {label}: {twin} and {s.name} are the same system (the same model, training "
                                  "and data once token-op and policy names are resolved, e.g. token_concat is "
                                  "pixel_shuffle); drop one or make them differ")


def named_suite(recipes: Sequence[str]) -> dict:
    """Recipes named on the command line: one budget ("as named"), the first recipe is the baseline."""
    if not recipes:
        raise ConfigError("name at least one recipe to compare, e.g. --compare venvl,leomini,llava_stf")
    if len(set(recipes)) != len(recipes):
        raise ConfigError(f"a recipe is named twice in {', '.join(recipes)}; name each once")
    return {"name": "named recipes", "baseline": recipes[0],
            "budgets": {"as named": [{"name": r, "recipe": r} for r in recipes]}}


def _quick(raw: dict, overrides: Sequence[str]) -> dict:
    """The recipe's own model on the quick budget (tiny parts, a few steps, one thread as tests run)."""
    q = json.loads(json.dumps(QUICK_RECIPE))
    return load_config({**raw, "data": q["data"], "eval": {**raw["eval"], **q["eval"]},
                        "train": {**raw["train"], **{k: v for k, v in q["train"].items() if k != "stage"},
                                  "num_threads": None, "save_every": 0}}, overrides)


# ---------------------------------------------------------------- checks before training
def _dotted(cfg: dict, key: str):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def check_comparable(systems: Sequence[System], quick: bool, unequal: bool = False,
                     log: Callable[[str], None] = print) -> None:
    """Refuse, before any training, systems that cannot be compared: different evaluation sets, training data,
    steps or stage, or visual tokens other than their budget's. Measures each system's tokens and LLM MACs."""
    for key in SHARED:
        seen: dict[str, list[str]] = {}
        for s in systems:
            seen.setdefault(json.dumps(_dotted(s.cfg, key), sort_keys=True, default=str), []).append(s.key)
        if len(seen) > 1 and not (unequal and key != "data.eval"):
            raise ConfigError(f"the systems differ in {key}: " + "; ".join(f"{', '.join(v)}: {k}" for k, v in
                              seen.items()) + f"; give them the same {key} (a --{key} override applies to all)"
                              + ("" if key == "data.eval" else ", or pass --unequal to compare them as they are"))
    for s in systems:
        sample = build_dataset({**s.cfg["data"]["eval"][0], "n": 1})[0]
        model = tiny_model(s.cfg, None) if quick else build_model(s.cfg)
        m = measured_schedule(model.to(default_device()).eval(), sample)
        s.tokens, s.llm_gmacs = int(m["visual_tokens"]), float(m["llm_gmacs"])
        del model
        gc.collect()
        log(f"  {s.key:<34} {s.recipe:<24} {s.tokens:>4} visual tokens, LLM {s.llm_gmacs:.3g} GMACs")
    for label in dict.fromkeys(s.budget for s in systems):
        group = [s for s in systems if s.budget == label]
        want = int(label) if label.isdigit() else group[0].tokens
        off = [f"{s.name} ({s.tokens})" for s in group if s.tokens != want]
        if off and not unequal:
            raise ConfigError(f"budget {label}: {', '.join(off)} feed the LM other than {want} visual tokens per "
                              "image; change their token ops so the budgets match" +
                              ("" if label.isdigit() else ", or pass --unequal to compare them as they are"))


# ---------------------------------------------------------------- running
def _finished(out: Path, cfg: dict, quick: bool) -> bool:
    """A finished run of exactly this config (same resolved recipe, same quick flag)."""
    try:
        done = json.loads((out / RESULTS).read_text())
    except (OSError, ValueError):
        return False
    if done.get("quick") != quick or not isinstance(done.get("config"), dict):
        return False
    same = json.loads(json.dumps({**cfg, "output_dir": str(out)}, default=str))
    return json.loads(json.dumps(with_current_defaults(done["config"]), default=str)) == same


def _resumable(run_dir: Path, cfg: dict, log: Callable[[str], None]) -> bool:
    """Whether the system's last checkpoint belongs to this very config (else it trains again from step 0)."""
    found = list_checkpoints(run_dir / "train")
    if not found:
        return False
    try:
        diff = config_diff(cfg, with_current_defaults(read_yaml(found[-1] / CONFIG_FILE)))
    except ConfigError as e:
        diff = [str(e)]
    if diff:
        log(f"  its checkpoint {found[-1]} is from another config ({'; '.join(diff[:3])}): training it again")
    return not diff


def _eval_rows(out: Path, cfg: dict) -> list:
    return [read_results(out / "eval" / "as_trained" / eval_set_name(spec)) for spec in cfg["data"]["eval"]]


def run_comparison(spec: str | Sequence[str], out_dir: str | os.PathLike | None = None, quick: bool = False,
                   overrides: Sequence[str] = (), budgets: Sequence[str] = (), only: Sequence[str] = (),
                   check: bool = False, unequal: bool = False, fresh: bool = False, report: bool = False,
                   progress: bool = True, log: Callable[[str], None] = print, command: str | None = None) -> dict:
    """Resolve and check every system, then train + evaluate those not finished yet, and write the comparison
    (``report``: only write the comparison of the systems finished so far; nothing is built or trained)."""
    named = not isinstance(spec, str) or not is_suite(spec)
    suite = named_suite(list(spec) if not isinstance(spec, str) else
                        [r.strip() for r in spec.split(",") if r.strip()]) if named else read_suite(spec)
    if unequal and not named:
        raise ConfigError("--unequal is for recipes named on the command line; a suite's systems share a budget")
    cuda = default_device().type == "cuda"
    systems = resolve_suite(suite, quick, overrides, [str(b) for b in budgets], list(only), cuda=cuda and not quick)
    out = Path(out_dir or f"runs/compare-{suite['name'].replace(' ', '-')}")
    for s in systems:
        s.cfg["output_dir"] = str(out / s.budget.replace(" ", "_") / s.name)
    if report:
        done = sum(_finished(Path(s.cfg["output_dir"]), s.cfg, quick) for s in systems)
        log(f"--report: {done} of {len(systems)} system(s) finished with this config; nothing trains")
        return write_summary(suite, systems, out, quick, overrides, command, 0.0, log)
    log(f"{len(systems)} system(s) of {suite['name']!r}" + (" (the suite's CUDA budget)" if cuda and not quick
                                                            and suite.get("cuda") else "") +
        "; measuring the visual tokens each feeds its LM, before anything trains:")
    check_comparable(systems, quick, unequal, log)
    if check:
        log("--check: every system builds and its budget matches; nothing was trained")
        return {"systems": [{"key": s.key, "tokens": s.tokens, "llm_gmacs": s.llm_gmacs} for s in systems]}
    t0 = time.perf_counter()
    summary: dict = {}
    shared = SharedCaches()  # systems on the same encoder and images encode them once (frozen encoders)
    for i, s in enumerate(_by_encoders(systems), 1):
        run_dir = Path(s.cfg["output_dir"])
        if not fresh and _finished(run_dir, s.cfg, quick):
            log(f"\n=== [{i}/{len(systems)}] {s.key}: finished earlier with the same config, reused ({run_dir})")
            continue
        resume = not fresh and _resumable(run_dir, s.cfg, log)
        log(f"\n=== [{i}/{len(systems)}] {s.key} (recipe {s.recipe})" + (", resuming its training" if resume else ""))
        run_demo(s.cfg, run_dir, quick=quick, progress=progress, log=log, tiny_size=None, resume=resume,
                 command=command, shared=shared)
        summary = write_summary(suite, systems, out, quick, overrides, command, time.perf_counter() - t0, log)
    return summary or write_summary(suite, systems, out, quick, overrides, command, time.perf_counter() - t0, log)


UNRECORDED = " (aux. not recorded)"  # a curve drawn as logged: the run predates recording its auxiliary losses


def task_losses(train: dict) -> dict:
    """The task (cross-entropy) part of a run's loss per step: the logged loss less its auxiliary terms (MoE balance,
    SIP), so that systems with and without them compare. ``known`` is False when a step's auxiliary part was not
    recorded (runs before compactvl recorded it): the logged losses are returned as they are."""
    aux = train.get("aux_losses") or [None] * len(train["losses"])
    known = len(aux) == len(train["losses"]) and all(a is not None for a in aux)
    return {"losses": [x - a for x, a in zip(train["losses"], aux)] if known else list(train["losses"]), "known": known}


def _by_encoders(systems: Sequence[System]) -> list[System]:
    """The order to run ``systems`` in: grouped by their encoders (in order of first appearance, so the baseline
    stays first), so that each group's training images are encoded once (``SharedCaches`` keeps one group's)."""
    groups: dict[str, list[System]] = {}
    for s in systems:
        groups.setdefault(json.dumps(s.cfg["model"]["encoders"], sort_keys=True, default=str), []).append(s)
    return [s for group in groups.values() for s in group]


# ---------------------------------------------------------------- the report
def write_summary(suite: dict, systems: Sequence[System], out: Path, quick: bool, overrides: Sequence[str],
                  command: str | None, seconds: float, log: Callable[[str], None] = print) -> dict:
    """compare.json / compare.md / compare.png / curves.png over the systems finished so far."""
    rows, charts, curves = [], {}, {}
    for label in dict.fromkeys(s.budget for s in systems):
        group = [s for s in systems if s.budget == label]
        done = {s.name: s for s in group if _finished(Path(s.cfg["output_dir"]), s.cfg, quick)}
        base = done.get(suite["baseline"])
        base_results = _eval_rows(Path(base.cfg["output_dir"]), base.cfg) if base else None
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
                                                     else None)}
                         for r, b in zip(results, base_results or [None] * len(results))}})
    summary = {"suite": suite["name"], "baseline": suite["baseline"], "quick": quick,
               "command": command or " ".join(["compactvl", "demo", *sys.argv[2:]]), "machine": machine(),
               "overrides": list(overrides), "seconds_this_invocation": seconds, "systems": rows}
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


def markdown_table(summary: dict) -> str:
    """One table per budget: tokens, MACs, steps, seconds, and per set the accuracy [95 % CI] and the paired
    difference with the baseline [95 % CI] (within the noise or not)."""
    lines = [f"# Comparison `{summary['suite']}`{' (--quick: tiny random parts, meaningless numbers)' if summary['quick'] else ''}",
             "", f"Baseline: `{summary['baseline']}`. Command: `{summary['command']}`.", ""]
    for label in dict.fromkeys(r["budget"] for r in summary["systems"]):
        group = [r for r in summary["systems"] if r["budget"] == label]
        sets = next((list(r["sets"]) for r in group if r["status"] == "done"), [])
        lines += [f"## Budget: {label} visual tokens", "",
                  "| " + " | ".join(["system", "tokens", "LLM GMACs", "steps", "train s", "machine"]
                                    + [f"{s} accuracy [95% CI] | Δ vs baseline [95% CI]" for s in sets]) + " |",
                  "|---" * (6 + 2 * len(sets)) + "|"]
        for r in group:
            if r["status"] != "done":
                lines.append(f"| {r['system']} | not run yet |" + " |" * (4 + 2 * len(sets)))
                continue
            cells = []
            for s in sets:
                x = r["sets"][s]
                cells.append(f"{x['accuracy']:.3f} [{x['ci95'][0]:.3f}, {x['ci95'][1]:.3f}] (n={x['n']})")
                v = x["vs_baseline"]
                cells.append("baseline" if v is None else
                             f"{v['difference']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]"
                             + (" (noise)" if v["within_noise"] else ""))
            lines.append(f"| {r['system']} | {r['visual_tokens']} | {r['llm_gmacs']:.3g} | {r['train_steps']} | "
                         f"{_train_seconds(r)} | {r['machine']}, {r['precision']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)

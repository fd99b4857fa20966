"""The suites of ``compactvl demo --compare``: reading and resolving them into systems, the checks that they compare
(equal visual tokens, data and training budget) before anything trains, and whether a system's run is finished."""
from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..config import CONFIG_FILE, RECIPE_DIR, load_config, read_yaml, with_current_defaults
from ..demo import QUICK_RECIPE, RESULTS, tiny_model
from ..device import default_device
from ..errors import ConfigError
from ..evaluate import eval_set_name, read_results
from ..measure.counted import measured_schedule
from ..registry import POLICIES, TOKEN_OPS
from ..train import build_dataset, build_model, list_checkpoints
from ..train.checkpoint import config_diff

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


# ---------------------------------------------------------------- finished runs
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


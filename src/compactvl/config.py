"""YAML recipes: defaults, dotted command-line overrides, validation, and the resolved config saved with results.

A recipe is a YAML mapping with four sections plus ``output_dir`` (every key is optional; the defaults are the
dataclasses below)::

    model:  {lm: smollm2-135m-instruct, encoders: [dinov2-small], token_ops: [{op: avgpool, k: 4}], ...}
    data:   {train: [{name: synthvqa, n: 2000}], eval: [{name: synthvqa, split: test, n: 300}]}
    train:  {stage: align, lr: 1.0e-3, batch_size: 16, ...}
    eval:   {batch_size: 16, max_new_tokens: 8}
    output_dir: runs/demo

``load_config("demo", ["--train.lr", "1e-4", "--data.train.0.n=500"])`` reads a packaged recipe by bare name
(``src/compactvl/recipes/<name>.yaml``) or a file by path, applies overrides (values parsed as YAML, so
``[1, 2]`` and ``{op: avgpool, k: 2}`` work; list items are addressed by index), checks every key and type
against the defaults (unknown keys fail with the closest known one), and returns a plain dict. ``save_config``
writes it as ``config.yaml`` (atomically) beside every checkpoint and result, so each output says exactly how it
was made.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from .atomic import write_file_atomically
from .errors import ConfigError

CONFIG_FILE = "config.yaml"
# One name per preset everywhere (weights in compactvl.sources, shapes in compactvl.measure.presets, recipes); the
# old names stay accepted as aliases.
PRESET_ALIASES = {"smollm2-135m": "smollm2-135m-instruct", "dinov2-small-224": "dinov2-small"}


def preset_name(name: object) -> str:
    """The canonical spelling of a preset name (lower case, aliases resolved); other strings come back lowered."""
    key = str(name).lower()
    return PRESET_ALIASES.get(key, key)

RECIPE_DIR = Path(__file__).parent / "recipes"


@dataclass
class ModelSection:
    lm: str = "smollm2-135m-instruct"  # built-in name, local dir or hub id (compactvl.sources.load_lm)
    encoders: list = field(default_factory=lambda: ["dinov2-small"])  # names, or {name: ..., image_size: ...}
    encoder_layers: Any = None  # one layer index (or null = default) per encoder
    token_ops: list = field(default_factory=list)  # [{op: avgpool, k: 4}, ...] (compactvl.ops)
    projector: dict = field(default_factory=lambda: {"type": "mlp", "depth": 2})
    policies: list = field(default_factory=list)  # LayerPolicies (compactvl.policies)
    experts: list = field(default_factory=list)  # MoE surgery on the LM (compactvl.experts), e.g. [{expert: hte}]
    position_policy: str = "auto"  # keep | compact | auto: what the policies' reference code does (PyramidDrop,
    # SparseVLM renumber: compact; FastV keeps positions: keep)
    system_prompt: Any = None  # null: the chat template's own default
    init: Any = None  # a saved CompactVLM directory to start from instead of building from parts


@dataclass
class DataSection:
    train: list = field(default_factory=lambda: [{"name": "synthvqa", "split": "train"}])
    eval: list = field(default_factory=lambda: [{"name": "synthvqa", "split": "test"}])


@dataclass
class TrainSection:
    stage: str = "align"  # align: projector (+ learnable token ops) | sft: + the LM (fully, or LoRA if `lora`)
    lora: Any = None  # {r: 8, alpha: 16, dropout: 0.0, target_modules: [q_proj, v_proj], layers: null}
    train_encoders: bool = False
    lr: float = 1e-3
    lm_lr: Any = None  # learning rate of the LM's pretrained weights in full sft (null: lr); new modules use lr
    # {module-name prefix: multiplier of lr} for the new modules, e.g. {projector: 1.0, token_ops.1: 0.1}; the
    # longest matching prefix wins; the LM's pretrained weights keep lm_lr (null: every new module at lr)
    lr_scale: Any = None
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    warmup_ratio: float = 0.05  # of all optimizer steps; warmup_steps wins when set
    warmup_steps: Any = None
    min_lr_ratio: float = 0.0  # the cosine decays to lr * min_lr_ratio
    epochs: int = 1
    max_steps: Any = None  # optimizer steps; overrides epochs
    batch_size: int = 16  # global: samples per optimizer step, over all processes and accumulation
    micro_batch_size: Any = None  # samples per forward per process (null: batch_size / processes)
    max_grad_norm: float = 1.0  # 0 disables clipping
    precision: str = "auto"  # auto | fp32 | bf16 (auto: bf16 autocast on CUDA, and on CPUs with AMX-BF16)
    seed: int = 0
    save_every: int = 0  # checkpoint every N optimizer steps (0: only at the end)
    keep_last: int = 2  # checkpoints kept on disk
    feature_cache: str = "auto"  # auto | precompute | lazy | off (frozen encoders only)
    feature_cache_gb: float = 4.0  # auto precomputes when the training set's features fit in this
    log_every: int = 1
    num_threads: Any = None  # torch.set_num_threads on CPU (null: leave torch's choice)


@dataclass
class EvalSection:
    batch_size: int = 16
    max_new_tokens: int = 8
    precision: str = "fp32"  # fp32 | bf16 | auto (as train.precision): autocast for generation
    # the same trained weights under other token ops / layer policies: [{name: ..., token_ops: [...], policies: [...]}]
    variants: list = field(default_factory=list)


SECTIONS = {"model": ModelSection, "data": DataSection, "train": TrainSection, "eval": EvalSection}
DATASET_KEYS = {"name": None, "split": "train", "n": None, "seed": 0, "image_folder": None, "skip_malformed": False,
                "difficulty": None, "categories": None, "distractors": None, "task": None}
# synthvqa tasks (``task``): vqa (null, one-word answers) | describe (every drawn object; training only)
DATASET_TASKS = ("vqa", "describe")
STAGES = ("align", "sft")
PRECISIONS = ("auto", "fp32", "bf16")
CACHE_MODES = ("auto", "precompute", "lazy", "off")


def defaults() -> dict:
    """The full default config as a plain dict."""
    out = {name: dataclasses.asdict(cls()) for name, cls in SECTIONS.items()}
    out["output_dir"] = "runs/run"
    return out


# ---------------------------------------------------------------- recipes
def list_recipes() -> list[str]:
    """Names of the packaged recipes (``compactvl train NAME``)."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def recipe_path(recipe: str | os.PathLike) -> Path:
    """A recipe file: an existing path, or the bare name of a packaged recipe."""
    p = Path(recipe)
    if p.is_file():
        return p
    if p.suffix == "" and (RECIPE_DIR / f"{p.name}.yaml").is_file() and len(p.parts) == 1:
        return RECIPE_DIR / f"{p.name}.yaml"
    raise ConfigError(f"recipe {str(recipe)!r} not found; pass the path of a .yaml file or one of the packaged "
                      f"recipes: {', '.join(list_recipes()) or '(none)'}")


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read recipe {path}: {e.strerror or e}; check the path") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where} ({getattr(e, 'problem', None) or e}); fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a YAML mapping (model:, data:, train:, eval:), not a "
                          f"{type(data).__name__}")
    return data


def with_current_defaults(saved: dict) -> dict:
    """A resolved config saved by an earlier run (a checkpoint, results.json), read again with this version's
    defaults, so a key added since (with its default) does not make the same experiment look changed. A config this
    version cannot read is returned as it is (a comparison with it then names the difference)."""
    try:
        return load_config(saved)
    except ConfigError:
        return saved


def load_config(recipe: str | os.PathLike | dict | None = None, overrides: Sequence[str] = ()) -> dict:
    """Defaults ← recipe (a path, a packaged name or a dict) ← dotted overrides; validated and normalized."""
    cfg = defaults()
    name = "run"
    if isinstance(recipe, dict):
        raw = copy.deepcopy(recipe)
    elif recipe is not None:
        path = recipe_path(recipe)
        raw, name = read_yaml(path), path.stem
        cfg["output_dir"] = f"runs/{name}"
    else:
        raw = {}
    _merge(cfg, raw, "")
    overrides = parse_overrides(overrides)
    if overrides:
        validate(cfg)  # normalizes dataset entries, so overrides can address e.g. data.train.0.n
    for key, value in overrides:
        set_dotted(cfg, key, value)
    return validate(cfg)


def _merge(base: dict, new: dict, where: str) -> None:
    for k, v in new.items():
        path = f"{where}{k}"
        if k not in base:
            raise ConfigError(f"unknown config key '{path}'{_suggest(k, base)}; known keys here: "
                              f"{', '.join(sorted(base))}")
        if isinstance(base[k], dict) and isinstance(v, dict) and path in SECTIONS:
            _merge(base[k], v, f"{path}.")
        else:
            base[k] = v


def _suggest(key: str, known: dict | Sequence[str]) -> str:
    close = difflib.get_close_matches(str(key), list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


# ---------------------------------------------------------------- overrides
def parse_value(text: str) -> Any:
    """A command-line value as YAML (``1e-4`` is read as a number, which plain YAML 1.1 would not do)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse override value {text!r} ({e}); quote YAML lists/maps, e.g. "
                          "'[{op: avgpool, k: 2}]'") from None
    if isinstance(value, str):
        try:
            return float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "infinity") else value
        except ValueError:
            return value
    return value


def parse_overrides(argv: Sequence[str]) -> list[tuple[str, Any]]:
    """``["--train.lr", "1e-4", "--data.train.0.n=50"]`` → ``[("train.lr", 1e-4), ("data.train.0.n", 50)]``."""
    out, args, i = [], list(argv), 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or len(a) == 2:
            raise ConfigError(f"unexpected argument {a!r}; overrides look like --section.key VALUE "
                              "(e.g. --train.lr 1e-4)")
        key, eq, value = a[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"override --{key} has no value; write --{key} VALUE or --{key}=VALUE")
            value, i = args[i + 1], i + 1
        out.append((key.replace("-", "_"), parse_value(value)))
        i += 1
    return out


def set_dotted(cfg: dict, key: str, value: Any) -> None:
    """Set ``cfg["a"]["b"][0]["c"]`` from ``"a.b.0.c"``; every step but the last must exist."""
    parts = key.split(".")
    node: Any = cfg
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        here = ".".join(parts[:depth + 1])
        if isinstance(node, list):
            if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                raise ConfigError(f"override '{key}': '{here}' indexes a list of {len(node)} item(s); use an "
                                  f"index 0..{len(node) - 1} or replace the whole list (--{'.'.join(parts[:depth])} "
                                  "'[...]')")
            part = int(part)
        elif isinstance(node, dict):
            open_map = depth >= 2 or (depth == 1 and parts[0] not in SECTIONS)
            if part not in node and not (last and open_map):
                known = list(node)
                raise ConfigError(f"unknown config key '{here}'{_suggest(part, known)}; known keys here: "
                                  f"{', '.join(map(str, known))}")
        else:
            raise ConfigError(f"override '{key}': '{'.'.join(parts[:depth])}' is a {type(node).__name__}, not a "
                              "mapping or list")
        if last:
            node[part] = value
        else:
            node = node[part]


# ---------------------------------------------------------------- validation
def _check_type(path: str, value: Any, default: Any) -> Any:
    if default is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {value!r}")
    elif isinstance(default, (int, float)):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        if isinstance(default, int) and not isinstance(default, bool):
            if float(value) != int(value):
                raise ConfigError(f"{path} must be a whole number, got {value!r}")
            value = int(value)
        else:
            value = float(value)
    elif not isinstance(value, type(default)):
        raise ConfigError(f"{path} must be a {type(default).__name__}, got {value!r} ({type(value).__name__})")
    return value


def dataset_spec(item: Any, where: str, split: str) -> dict:
    """Normalize a dataset entry (a name/path string or a mapping) to a dict with every key of DATASET_KEYS."""
    spec = {"name": item} if isinstance(item, str) else item
    if not isinstance(spec, dict) or not spec.get("name"):
        raise ConfigError(f"{where}: a dataset entry is a name (synthvqa, easyvqa, a LLaVA .json path) or a mapping "
                          f"with 'name', got {item!r}")
    unknown = sorted(set(spec) - set(DATASET_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown dataset key(s) {unknown}{_suggest(unknown[0], DATASET_KEYS)}; known: "
                          f"{', '.join(DATASET_KEYS)}")
    out = {**DATASET_KEYS, "split": split, **spec}
    if out["n"] is not None and (not isinstance(out["n"], int) or isinstance(out["n"], bool) or out["n"] < 1):
        raise ConfigError(f"{where}.n must be a positive whole number or null (whole split), got {out['n']!r}")
    if out["task"] is not None and out["task"] not in DATASET_TASKS:
        raise ConfigError(f"{where}.task must be one of {', '.join(DATASET_TASKS)} or null (vqa), got "
                          f"{out['task']!r}")
    return out


def validate(cfg: dict) -> dict:
    """Check types and values; normalize dataset entries. Returns the same dict."""
    unknown = sorted(set(cfg) - set(SECTIONS) - {"output_dir"})
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown}{_suggest(unknown[0], [*SECTIONS, 'output_dir'])}; "
                          f"a recipe has {', '.join(SECTIONS)} and output_dir")
    for name, cls in SECTIONS.items():
        if not isinstance(cfg[name], dict):
            raise ConfigError(f"'{name}' must be a mapping, got {cfg[name]!r}")
        base = dataclasses.asdict(cls())
        for key, value in cfg[name].items():
            if key not in base:
                raise ConfigError(f"unknown config key '{name}.{key}'{_suggest(key, base)}; known keys: "
                                  f"{', '.join(base)}")
            cfg[name][key] = _check_type(f"{name}.{key}", value, base[key])
    if not isinstance(cfg["output_dir"], str) or not cfg["output_dir"]:
        raise ConfigError(f"output_dir must be a directory path, got {cfg['output_dir']!r}")
    t, d, m = cfg["train"], cfg["data"], cfg["model"]
    _choice("train.stage", t["stage"], STAGES)
    _choice("train.precision", t["precision"], PRECISIONS)
    _choice("eval.precision", cfg["eval"]["precision"], PRECISIONS)
    _choice("train.feature_cache", t["feature_cache"], CACHE_MODES)
    for key in ("lr", "batch_size", "epochs"):
        if t[key] <= 0:
            raise ConfigError(f"train.{key} must be > 0, got {t[key]}")
    if t["lm_lr"] is not None and (isinstance(t["lm_lr"], bool) or not isinstance(t["lm_lr"], (int, float))
                                   or t["lm_lr"] <= 0):
        raise ConfigError(f"train.lm_lr must be a number > 0 or null (= train.lr), got {t['lm_lr']!r}")
    for key in ("max_steps", "micro_batch_size", "warmup_steps", "num_threads"):
        low = 0 if key == "warmup_steps" else 1
        if t[key] is not None and (not isinstance(t[key], int) or isinstance(t[key], bool) or t[key] < low):
            raise ConfigError(f"train.{key} must be a whole number >= {low} or null, got {t[key]!r}")
    if t["lora"] is not None:
        if t["stage"] != "sft":
            raise ConfigError("train.lora needs train.stage: sft (stage align trains only the projector); set "
                              "--train.stage sft or drop lora")
        if not isinstance(t["lora"], dict):
            raise ConfigError(f"train.lora must be a mapping like {{r: 8, alpha: 16}}, got {t['lora']!r}")
    _check_lr_scale(t["lr_scale"])
    if not m["encoders"]:
        raise ConfigError("model.encoders is empty; name at least one vision encoder (e.g. dinov2-small)")
    d["train"] = [dataset_spec(x, f"data.train.{i}", "train") for i, x in enumerate(_as_list(d["train"]))]
    d["eval"] = [dataset_spec(x, f"data.eval.{i}", "test") for i, x in enumerate(_as_list(d["eval"]))]
    for i, spec in enumerate(d["eval"]):
        if spec["task"] == "describe":
            raise ConfigError(f"data.eval.{i}: task describe cannot be evaluated: its answer is a whole description, "
                              "which exact-match accuracy would score as wrong for any other wording; put it in "
                              "data.train (an align stage) and evaluate on the vqa task (drop task)")
    return cfg


def _check_lr_scale(scale: Any) -> None:
    """``train.lr_scale``: null or a mapping of module-name prefixes to positive multipliers. Whether each prefix
    names a trainable parameter is checked against the model (``compactvl.train.trainable.param_groups``)."""
    if scale is None:
        return
    if not isinstance(scale, dict):
        raise ConfigError(f"train.lr_scale must be a mapping of module-name prefixes to multipliers of train.lr, "
                          f"e.g. {{projector: 1.0, token_ops: 0.1}}, got {scale!r}")
    for prefix, mult in scale.items():
        if not isinstance(prefix, str) or not prefix or prefix != prefix.strip(".") or " " in prefix:
            raise ConfigError(f"train.lr_scale: {prefix!r} is not a module-name prefix; write dotted names as in "
                              "model.named_parameters(), e.g. projector or token_ops.1")
        if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not mult > 0 or mult == float("inf"):
            raise ConfigError(f"train.lr_scale.{prefix} must be a number > 0 (a multiplier of train.lr), got "
                              f"{mult!r}; leave the prefix out to train it at train.lr")


def _as_list(x: Any) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _choice(path: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{path} must be one of {', '.join(allowed)}, got {value!r}")


# ---------------------------------------------------------------- saving
def dump_config(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None, width=110)


def save_config(cfg: dict, directory: str | os.PathLike, name: str = CONFIG_FILE) -> Path:
    """Write the resolved config as YAML into ``directory`` (temp file + rename)."""
    directory = Path(directory)
    text = dump_config(cfg)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write_file_atomically(directory / name, text)
    except OSError as e:
        raise ConfigError(f"cannot write {directory / name}: {e.strerror or e}; choose a writable output "
                          "directory") from None
    return directory / name

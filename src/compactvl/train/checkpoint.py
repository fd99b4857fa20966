"""Training checkpoints: ``OUTPUT_DIR/checkpoints/step-N`` holds only the trainable weights + optimizer + scheduler +
RNG states (torch, numpy, python, CUDA; one set per process) + step + losses so far + data-order state + the resolved
config + ``manifest.json`` (every file's size and SHA-256, written last). Written by rank 0 into a temp directory
that is fsynced and renamed into place (``compactvl.atomic``), so a failure while writing leaves the previous
checkpoint as it was. Loading checks the manifest (sizes and hashes) before reading anything, so every kind of damage
is a CheckpointError naming the file; ``--resume`` falls back past damaged checkpoints to the newest intact one.
Resuming checks the recipe, the data and the process count are the same and puts every state back, so the run
continues to the same weights and losses as an uninterrupted one."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..atomic import free_space, remove_stale, write_dir_atomically
from ..config import CONFIG_FILE, dump_config, with_current_defaults
from ..errors import CheckpointError, ConfigError
from ..manifest import verify_manifest, write_manifest
from .parallel import Parallel

CKPT_DIR = "checkpoints"
WEIGHTS = "trainable.safetensors"
STATE = "state.pt"
META = "trainer_state.json"
STEP_DIR = re.compile(r"^step-([0-9]+)$")
# keys that may change between a run and its resume. All but num_threads leave the result bit-identical; num_threads
# changes the order of float sums in CPU kernels, so losses may differ in the last bits and drift apart over the
# steps (docs/training.md, "Checkpoints and resume")
RESUME_FREE = {"train.save_every", "train.keep_last", "train.log_every", "train.num_threads", "train.feature_cache",
               "train.feature_cache_gb", "output_dir", "data.eval", "eval"}
TODO = "resume from an earlier checkpoint (--resume without a path takes the newest intact one) or delete this one"


# ---------------------------------------------------------------- RNG state
def rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "python": random.getstate()}
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    s["numpy"] = {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    n = s["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- reading
def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The checkpoint directories ``step-N`` under ``output_dir/checkpoints``, oldest first (temp directories of a
    write in progress are never named so; ``load_checkpoint`` checks one is intact)."""
    root = Path(output_dir) / CKPT_DIR
    found = [p for p in root.glob("step-*") if STEP_DIR.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def load_checkpoint(path: str | os.PathLike, verify: bool = True) -> tuple[dict[str, Tensor], dict, dict]:
    """(trainable weights, state (optimizer / scheduler / rng / data), meta) of a checkpoint directory, after checking
    it against its manifest (sizes; SHA-256 of every file unless ``verify=False``). Damage: CheckpointError naming
    the file."""
    path = Path(path)
    missing = [f for f in (WEIGHTS, STATE, META) if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"{path} is not a complete training checkpoint (missing {', '.join(missing)}); pick "
                              f"one listed under {path.parent}")
    verify_manifest(path, full=verify, todo=TODO, must_list=(WEIGHTS, STATE, META, CONFIG_FILE))
    reading = path / WEIGHTS
    try:  # the manifest matched: these fail only on a checkpoint written wrong; name the file all the same
        weights = load_file(str(reading))
        reading = path / STATE
        state = torch.load(reading, map_location="cpu", weights_only=True)
        if not (isinstance(state, dict) and {"optimizer", "scheduler", "rng", "step", "data", "losses"} <= set(state)
                and isinstance(state["data"], dict) and {"size", "batch_size"} <= set(state["data"])):
            raise ValueError("not a dict of optimizer, scheduler, rng, step, data and losses")
        reading = path / META
        meta = json.loads(reading.read_text())
        if not isinstance(meta, dict):
            raise ValueError(f"a JSON {type(meta).__name__} where an object belongs")
    except Exception as e:  # noqa: BLE001 - any decoding failure means a damaged checkpoint
        raise CheckpointError(f"cannot read {reading} ({type(e).__name__}: {e}); {TODO}") from e
    return weights, state, meta


def config_diff(a: Any, b: Any, where: str = "") -> list[str]:
    """``"key: old -> new"`` for every config value that differs (``RESUME_FREE`` keys excepted)."""
    if where.rstrip(".") in RESUME_FREE:
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in config_diff(a.get(k), b.get(k), f"{where}{k}.")]
    return [] if a == b else [f"{where.rstrip('.')}: {b!r} -> {a!r}"]


# ---------------------------------------------------------------- the component the trainer uses
class Checkpoints:
    """The checkpoints of one run directory: ``save`` (rank 0 writes, every process's RNG state included, older ones
    pruned to ``keep_last``), ``restore`` (every process; refuses a changed recipe, data or process count) and
    ``clear`` (a fresh run with overwrite)."""

    def __init__(self, output_dir: Path, parallel: Parallel, keep_last: int = 1):
        self.output_dir, self.parallel, self.keep_last = Path(output_dir), parallel, keep_last

    def list(self) -> list[Path]:
        return list_checkpoints(self.output_dir)

    def clear(self) -> None:
        shutil.rmtree(self.output_dir / CKPT_DIR, ignore_errors=True)

    def save(self, step: int, model, optimizer, scheduler, state: dict, meta: dict, cfg: dict) -> Path | None:
        """Write ``checkpoints/step-N`` (``state``: what else to keep, e.g. losses and data-order state; ``meta``:
        the JSON summary). Returns its path on rank 0, None on the others (all return after it is written)."""
        rngs = self.parallel.gather_object(rng_state())
        if not self.parallel.is_main:
            self.parallel.barrier()
            return None
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rngs, "step": step,
                 **state}
        meta = {"step": step, "world_size": self.parallel.world, **meta}
        weights = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}

        def write(tmp: Path) -> None:
            save_file(weights, str(tmp / WEIGHTS))
            torch.save(state, tmp / STATE)
            (tmp / META).write_text(json.dumps(meta, indent=1))
            (tmp / CONFIG_FILE).write_text(dump_config(cfg))
            write_manifest(tmp)

        path = self.output_dir / CKPT_DIR / f"step-{step:07d}"
        try:
            write_dir_atomically(path, write)
        except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error, not OSError
            raise CheckpointError(f"could not write checkpoint {path}: {e} ({free_space(path)}); the previous "
                                  "checkpoint is intact — free disk space or choose a writable output_dir, then "
                                  "--resume") from e
        finally:
            self.parallel.barrier()
        # keep the newest keep_last up to this step; later ones are from before a resume that fell back past them
        # (damaged, or about to be redone)
        found = self.list()
        later = [p for p in found if int(p.name.split("-")[1]) > step]
        earlier = [p for p in found if p not in later]
        for old in later + earlier[:-max(1, self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    def remove_stale(self) -> list[Path]:
        """Remove temp directories of checkpoint writes whose process is gone (a kill while writing)."""
        return remove_stale(self.output_dir / CKPT_DIR)

    def find(self, resume: bool | str | os.PathLike) -> tuple[Path | None, tuple | None, list[tuple[Path, str]]]:
        """The checkpoint ``resume`` names, loaded and checked: ``(path, (weights, state, meta), skipped)``. For
        True the newest intact one (``(None, None, [])`` when there is none; ``skipped``: the newer damaged ones with
        why); a path must be intact itself. Raises CheckpointError when checkpoints exist but none is intact."""
        if resume is not True:
            return Path(resume), load_checkpoint(resume), []
        skipped = []
        for path in reversed(self.list()):
            try:
                return path, load_checkpoint(path), skipped
            except CheckpointError as e:
                skipped.append((path, str(e)))
        if skipped:
            raise CheckpointError(f"no intact checkpoint under {self.output_dir / CKPT_DIR}: "
                                  + "; ".join(why for _, why in skipped)
                                  + " — train again from step 0 with --overwrite, or into a new output_dir")
        return None, None, []

    def restore(self, path: Path, loaded: tuple, cfg: dict, model, optimizer, scheduler, data: dict) -> dict:
        """Put ``loaded`` (``find``'s weights, state, meta of ``path``) into the model (trainable weights), optimizer,
        scheduler and this process's RNGs after checking it belongs to this run (``data``: the run's ``size`` and
        ``batch_size``). Returns its state."""
        weights, state, meta = loaded
        diff = []
        if (path / CONFIG_FILE).is_file():
            try:
                saved = yaml.safe_load((path / CONFIG_FILE).read_text())
            except (yaml.YAMLError, UnicodeDecodeError) as e:
                raise CheckpointError(f"cannot read {path / CONFIG_FILE} ({e}); {TODO}") from e
            diff = config_diff(cfg, with_current_defaults(saved) if isinstance(saved, dict) else saved)
        if diff:
            raise ConfigError(f"cannot resume from {path}: the config changed ({'; '.join(diff[:5])}); resume with "
                              "the recipe and overrides of the original run, or train into a new output_dir")
        was = state["data"]
        if was["size"] != data["size"] or was["batch_size"] != data["batch_size"]:
            raise ConfigError(f"cannot resume from {path}: it was trained on {was['size']} samples in batches of "
                              f"{was['batch_size']}, now {data['size']} / {data['batch_size']}; use the same data")
        world = self.parallel.world
        if meta.get("world_size", 1) != world:
            raise ConfigError(f"cannot resume from {path}: it was written by {meta.get('world_size')} processes, now "
                              f"{world}; resume with the same number of processes")
        mine = {n for n, p in model.named_parameters() if p.requires_grad}
        if set(weights) != mine:
            raise CheckpointError(f"{path} holds trainable weights {sorted(set(weights) ^ mine)[:4]} that do not "
                                  "match this model's; resume with the same recipe")
        model.load_state_dict(weights, strict=False)
        try:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"][self.parallel.rank])
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
            raise CheckpointError(f"cannot restore the optimizer / scheduler / RNG states of {path / STATE} "
                                  f"({type(e).__name__}: {e}); {TODO}") from e
        return state

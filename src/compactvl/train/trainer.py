"""Training: stages ``align`` / ``sft``, AdamW with warmup + cosine, accumulation, clipping, mixed precision,
atomic checkpoints with exact resume, the encoder-feature cache, and data parallelism over torch.distributed.

What a step does (global batch B = ``train.batch_size`` samples, split over P processes and micro-batches):

    order  = randperm(len(data), seed + epoch)            # data order is a pure function of (seed, epoch, step)
    batch  = order[pos·B : (pos+1)·B]; process r takes its contiguous B/P share, in micro-batches
    loss   = Σ_tokens CE / N_global + aux                 # N_global: answer tokens in the whole global batch
    grads  = all_reduce(Σ micro-batch grads)  → clip → AdamW → LR schedule

Normalizing by the global token count (not a mean of per-process means) makes a P-process run compute the same
gradient as one process with the same global batch, and makes accumulation exact. Logits are computed only for rows
that have a target (the LM head over a 49k vocabulary is a fifth of SmolLM2's compute).

Stages: ``align`` trains the projector (and learnable token ops); ``sft`` also trains the LM, fully or with LoRA
(peft adapters injected in place, merged into the weights on export). Encoders stay frozen unless
``train.train_encoders``. Checkpoints hold only trainable weights + optimizer + scheduler + RNG states (torch,
numpy, python; one set per process) + step + data-order state + the resolved config, written into a temp directory
renamed into place, so a failure while writing leaves the previous checkpoint as it was. ``fit(resume=True)``
continues from the latest one to the same weights and losses as an uninterrupted run.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, Dataset

from ..config import CONFIG_FILE, dump_config, save_config
from ..errors import CheckpointError, ConfigError, InputError
from ..processor import IGNORE_INDEX
from .collate import collate
from .feature_cache import FeatureCache, warm_cache

CKPT_DIR = "checkpoints"
MODEL_DIR = "model"
WEIGHTS = "trainable.safetensors"
STATE = "state.pt"
META = "trainer_state.json"
LOG = "train_log.jsonl"
# keys that may change between a run and its resume (they do not change the result)
RESUME_FREE = {"train.save_every", "train.keep_last", "train.log_every", "train.num_threads", "train.feature_cache",
               "train.feature_cache_gb", "output_dir", "data.eval", "eval"}


# ---------------------------------------------------------------- components from a recipe
def build_model(cfg: dict):
    """A CompactVLM from ``cfg["model"]`` (``model.init``: load a saved one instead of building from parts)."""
    from ..model import CompactVLM

    m, t = cfg["model"], cfg["train"]
    if m.get("init"):
        return CompactVLM.from_pretrained(m["init"], train_encoders=bool(t["train_encoders"]))
    encoders: list[Any] = []
    for e in m["encoders"]:
        if isinstance(e, dict):
            from ..sources import load_encoder

            knobs = {k: v for k, v in e.items() if k != "name"}
            if "name" not in e:
                raise ConfigError(f"model.encoders entry {e} has no 'name'; write {{name: dinov2-small, ...}}")
            encoders.append(load_encoder(e["name"], **knobs))
        else:
            encoders.append(e)
    kw = {"system_prompt": m["system_prompt"]} if m["system_prompt"] is not None else {}
    return CompactVLM.build(lm=m["lm"], encoders=encoders, token_ops=m["token_ops"], projector=m["projector"],
                            policies=m["policies"], experts=m["experts"], position_policy=m["position_policy"],
                            encoder_layers=m["encoder_layers"], seed=t["seed"],
                            train_encoders=bool(t["train_encoders"]), **kw)


def build_dataset(spec: dict) -> Dataset:
    from ..data import get_dataset

    return get_dataset(spec["name"], spec["split"], n=spec["n"], seed=spec["seed"], image_folder=spec["image_folder"],
                       skip_malformed=spec["skip_malformed"], difficulty=spec["difficulty"],
                       categories=spec["categories"], distractors=spec["distractors"])


def build_train_data(specs: Sequence[dict]) -> Dataset:
    """One dataset from the ``data.train`` entries (concatenated in order)."""
    if not specs:
        raise ConfigError("data.train is empty; name at least one training set (e.g. synthvqa)")
    sets = [build_dataset(s) for s in specs]
    return sets[0] if len(sets) == 1 else ConcatDataset(sets)


def skipped_records(data: Dataset) -> int:
    """Malformed records skipped while loading (LLaVA files with skip_malformed)."""
    parts = data.datasets if isinstance(data, ConcatDataset) else [data]
    return sum(len(getattr(d, "skipped", [])) for d in parts)


# ---------------------------------------------------------------- trainable parameters
def add_lora(lm: nn.Module, spec: dict) -> None:
    """Inject LoRA adapters (peft) into ``lm`` in place. ``spec``: r, alpha, dropout, target_modules, layers."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ConfigError("train.lora needs peft: pip install 'compactvl[train]' (or pip install peft)") from None
    known = {"r", "alpha", "dropout", "target_modules", "layers"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ConfigError(f"train.lora has unknown key(s) {unknown}; known: {', '.join(sorted(known))}")
    layers = spec.get("layers")
    cfg = LoraConfig(r=int(spec.get("r", 8)), lora_alpha=float(spec.get("alpha", 16)),
                     lora_dropout=float(spec.get("dropout", 0.0)),
                     target_modules=list(spec.get("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj"])),
                     layers_to_transform=list(layers) if layers is not None else None,
                     layers_pattern="layers" if layers is not None else None)
    try:
        inject_adapter_in_model(cfg, lm)
    except ValueError as e:
        raise ConfigError(f"cannot add LoRA with {spec}: {e}; check target_modules names the LM's linear "
                          "layers (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)") from None


def merge_lora(module: nn.Module) -> int:
    """Merge every LoRA adapter into its base layer and put the plain layer back; returns how many were merged."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return 0
    targets = [(name, m) for name, m in module.named_modules() if isinstance(m, LoraLayer)]
    for name, m in targets:
        m.merge()
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, m.get_base_layer())
    return len(targets)


def configure_trainable(model, stage: str, lora: dict | None = None, train_encoders: bool = False) -> list[str]:
    """Set requires_grad for a stage; returns the names of the trainable parameters. Both stages train the projector,
    learnable token ops and policies (e.g. SIP's head), and what expert surgery added to the LM (routers, experts —
    not the pretrained FFNs)."""
    from ..experts import added_parameters

    if stage not in ("align", "sft"):
        raise ConfigError(f"unknown stage {stage!r}; use align (projector only) or sft (projector + LM)")
    model.requires_grad_(False)
    model.projector.requires_grad_(True)
    model.token_ops.requires_grad_(True)
    if isinstance(getattr(model, "policies", None), nn.Module):
        model.policies.requires_grad_(True)
    if stage == "sft":
        if lora:
            add_lora(model.lm, lora)
            for name, p in model.lm.named_parameters():
                p.requires_grad_("lora_" in name)
        else:
            model.lm.requires_grad_(True)
    for p in added_parameters(model.lm):
        p.requires_grad_(True)
    if train_encoders:
        if not model.config.train_encoders:
            raise ConfigError("train.train_encoders needs a model built with train_encoders=True (build_model does "
                              "this from the recipe)")
        model.encoders.requires_grad_(True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise ConfigError(f"stage {stage} leaves nothing to train; check the projector has parameters")
    return names


# ---------------------------------------------------------------- precision / devices / schedule
def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: fp32). ``auto``: bf16 on CUDA with bf16 support, and on CPUs with AMX-BF16 tiles
    (where bf16 matmuls run several times faster than fp32); fp32 elsewhere."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    return torch.bfloat16 if device.type == "cpu" and amx() else None


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "python": random.getstate()}
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    s["numpy"] = {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def _set_rng_state(s: dict) -> None:
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


@contextmanager
def _stop_on_sigint(log: Callable[[str], None]) -> Iterator[list[bool]]:
    """While training: the first Ctrl-C (SIGINT) only asks the loop to stop after the step in progress (so the
    checkpoint holds a whole step); a second one interrupts at once, as usual. Yields ``[stop_requested]``. Outside
    the main thread (where signal handlers cannot be set) it changes nothing."""
    stop = [False]
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop[0]:
            raise KeyboardInterrupt
        stop[0] = True
        log("\nCtrl-C: stopping after this step and writing a checkpoint (Ctrl-C again to abort without one)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------- loss
def loss_terms(model, inputs) -> tuple[Tensor, int, Tensor | None]:
    """(sum of next-token CE over answer tokens, number of those tokens, auxiliary loss or None) for prepared
    inputs; ``ce / n + aux`` equals ``model(inputs).loss``, with LM-head logits computed only where there is a target."""
    out = model.runner.prefill(inputs.inputs_embeds, inputs.attention_mask, inputs.visual_mask, use_cache=False,
                               signals=model.signals(inputs))
    labels, orig = inputs.labels, out.state.orig_index
    L = labels.shape[1]
    nxt = orig + 1
    target = labels.gather(1, nxt.clamp(0, L - 1)).masked_fill((orig < 0) | (nxt >= L), IGNORE_INDEX)
    sel = target != IGNORE_INDEX
    n = int(sel.sum())
    if n == 0:
        raise InputError("no answer tokens to train on in this batch; every record needs a non-empty assistant answer")
    logits = model.runner.logits(out.hidden[sel])
    ce = nn.functional.cross_entropy(logits.float(), target[sel], reduction="sum")
    aux = [a for a in [inputs.aux_loss, *out.state.signals.get("aux_losses", [])] if a is not None]
    return ce, n, (sum(aux) if aux else None)


# ---------------------------------------------------------------- checkpoints
def write_dir_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)`` then rename ``tmp_dir`` to ``path`` (replacing an older ``path``). On any failure the
    temp dir is removed and ``path`` is untouched."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise CheckpointError(f"could not write checkpoint {path}: {e}; the previous checkpoint is intact — "
                                  "free disk space or choose a writable output_dir, then --resume") from e
        raise
    return path


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``output_dir/checkpoints``, oldest first."""
    root = Path(output_dir) / CKPT_DIR
    found = [p for p in root.glob("step-*") if p.is_dir() and all((p / f).is_file() for f in (WEIGHTS, STATE, META))]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict, dict]:
    """(trainable weights, state (optimizer / scheduler / rng / data), meta) of a checkpoint directory."""
    from safetensors.torch import load_file

    path = Path(path)
    missing = [f for f in (WEIGHTS, STATE, META) if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"{path} is not a complete training checkpoint (missing {', '.join(missing)}); pick "
                              f"one listed under {path.parent}")
    try:
        weights = load_file(str(path / WEIGHTS))
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
        meta = json.loads((path / META).read_text())
    except Exception as e:  # noqa: BLE001 - any decoding failure means a damaged checkpoint
        raise CheckpointError(f"cannot read checkpoint {path}: {e}; resume from an earlier checkpoint") from e
    return weights, state, meta


def _config_diff(a: Any, b: Any, where: str = "") -> list[str]:
    if where.rstrip(".") in RESUME_FREE:
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _config_diff(a.get(k), b.get(k), f"{where}{k}.")]
    return [] if a == b else [f"{where.rstrip('.')}: {b!r} -> {a!r}"]


# ---------------------------------------------------------------- trainer
@dataclass
class TrainResult:
    losses: list[float]  # global mean loss of every optimizer step, from step 1
    steps: int  # optimizer steps done (in total, including before a resume)
    total_steps: int
    samples_per_s: float  # training throughput of this run (excluding cache warm-up)
    elapsed_s: float
    output_dir: Path
    checkpoint: Path | None
    model_dir: Path | None  # the exported CompactVLM (None when stopped early)
    skipped_records: int = 0
    cache: dict = field(default_factory=dict)
    interrupted: bool = False  # Ctrl-C (SIGINT) stopped it after a whole step; the checkpoint holds that step


class Trainer:
    """``Trainer(model, train_data, cfg).fit(resume=False)``. ``cfg`` is a resolved config (compactvl.config);
    ``cfg["train"]`` drives the loop. Data parallel when torch.distributed is initialized (each process builds the
    same model and data and calls fit)."""

    def __init__(self, model, train_data: Dataset, cfg: dict, output_dir: str | os.PathLike | None = None,
                 progress: bool = True, log: Callable[[str], None] = print,
                 on_step: Callable[["Trainer", float], None] | None = None):
        self.model, self.data, self.cfg, self.t = model, train_data, cfg, cfg["train"]
        self.on_step = on_step  # called after every optimizer step with (trainer, seconds the step took)
        self.encode_seconds_per_image: float | None = None  # measured while the feature cache is filled
        self.output_dir = Path(output_dir or cfg["output_dir"])
        self.rank, self.world = _dist()
        self.progress, self._log = progress and self.rank == 0, log
        t = self.t
        if len(train_data) == 0:
            raise InputError("the training set is empty; check data.train names a dataset with samples")
        if t["batch_size"] % self.world:
            raise ConfigError(f"train.batch_size {t['batch_size']} does not split over {self.world} processes; use "
                              f"a multiple of {self.world}")
        self.micro = t["micro_batch_size"] or t["batch_size"] // self.world
        per_rank = t["batch_size"] // self.world
        if per_rank % self.micro:
            raise ConfigError(f"train.micro_batch_size {self.micro} does not divide the per-process batch {per_rank} "
                              f"(batch_size {t['batch_size']} / {self.world} processes); pick a divisor")
        self.steps_per_epoch = len(train_data) // t["batch_size"]
        if self.steps_per_epoch == 0:
            raise ConfigError(f"the training set has {len(train_data)} samples, fewer than train.batch_size "
                              f"{t['batch_size']}; lower batch_size or add data")
        self.total_steps = t["max_steps"] or t["epochs"] * self.steps_per_epoch
        self.warmup = t["warmup_steps"] if t["warmup_steps"] is not None else round(t["warmup_ratio"] * self.total_steps)
        self.device = model.device
        self.autocast = resolve_precision(t["precision"], self.device)
        self.losses: list[float] = []
        self.step = 0
        self.cache: FeatureCache | None = None
        self._end = self.total_steps  # the step fit() stops at (it sets it)

    def log(self, msg: str) -> None:
        if self.rank == 0 and self._log is not None:
            self._log(msg)

    # ------------------------------------------------------------ setup
    def _check_writable(self) -> None:
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            probe = self.output_dir / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"cannot write to the output directory {self.output_dir} ({e.strerror or e}); choose "
                              "a writable output_dir (--output-dir / --output_dir)") from None

    def _setup(self) -> None:
        t = self.t
        if t["num_threads"]:
            torch.set_num_threads(t["num_threads"])
        seed_everything(t["seed"])
        self.names = configure_trainable(self.model, t["stage"], t["lora"], t["train_encoders"])
        self.model.to(self.device)
        self.params = [p for _, p in self.model.named_parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self._param_groups(), lr=t["lr"], betas=tuple(t["betas"]))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, self.total_steps, self.warmup, t["min_lr_ratio"]))
        self.model.train()
        self.model.encoders.train(bool(t["train_encoders"]))

    def _param_groups(self) -> list[dict]:
        """Weight decay on matrices only; ``train.lm_lr`` for the LM's pretrained weights (full sft), ``lr`` for
        everything new (projector, token ops, policies, experts, LoRA adapters)."""
        from ..experts import added_parameters

        t = self.t
        new = {id(p) for p in added_parameters(self.model.lm)}
        groups: dict[tuple[bool, bool], list] = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                pretrained_lm = name.startswith("lm.") and "lora_" not in name and id(p) not in new
                groups.setdefault((pretrained_lm, p.ndim >= 2), []).append(p)
        return [{"params": ps, "weight_decay": t["weight_decay"] if decay else 0.0,
                 "lr": (t["lm_lr"] or t["lr"]) if lm else t["lr"]} for (lm, decay), ps in sorted(groups.items())]

    def _setup_cache(self) -> None:
        mode = self.t["feature_cache"]
        if mode == "off" or self.t["train_encoders"]:
            return
        self.cache = FeatureCache()
        self.cache.attach(self.model)
        if mode == "lazy":
            return
        indices = self.visited(self.step, self._end)  # only what this run will train on (max_steps bounds it)
        if mode == "auto":
            with self._autocast():
                warm_cache(self.model, [self.data[indices[0]]])
            need = self.cache.nbytes() * len(indices) / 2**30
            if need > self.t["feature_cache_gb"]:
                self.log(f"feature cache off: the training set would need ~{need:.1f} GiB (> train.feature_cache_gb "
                         f"{self.t['feature_cache_gb']}); set train.feature_cache: lazy or raise the limit")
                self.cache.clear()
                self.model.feature_cache = self.cache = None
                return
        t0 = time.perf_counter()
        with self._autocast():  # the precision the encoders would run in without the cache
            warm_cache(self.model, (self.data[i] for i in indices), total=len(indices),
                       batch_size=max(self.micro, 16), progress=self.progress)
        took = time.perf_counter() - t0
        self.encode_seconds_per_image = took / max(1, len(self.cache))
        self.log(f"feature cache: {len(self.cache)} images of {len(indices)} training samples encoded once in "
                 f"{took:.1f}s ({self.cache.nbytes() / 2**20:.0f} MiB)")

    def visited(self, start: int, end: int, all_ranks: bool = False) -> list[int]:
        """The sample indices trained on in steps ``start..end-1`` (by this process, or by all with ``all_ranks``),
        sorted and each once: what the feature cache encodes, so a short run (``max_steps``) never touches the rest
        of the training set."""
        return sorted({i for step in range(start, end) for i in self._indices(step, all_ranks)})

    def _prepare_output_dir(self, resume: bool | str | os.PathLike, overwrite: bool) -> None:
        if resume:
            return
        old = list_checkpoints(self.output_dir)
        if old and not overwrite:
            raise ConfigError(f"{self.output_dir} already holds checkpoints (latest {old[-1].name}); continue them "
                              "with --resume, or train into a new output_dir (or pass overwrite=True to delete them)")
        if self.world > 1:
            dist.barrier()  # every process has looked before rank 0 deletes anything
        if self.rank == 0:
            shutil.rmtree(self.output_dir / CKPT_DIR, ignore_errors=True)
            (self.output_dir / LOG).unlink(missing_ok=True)

    def _truncate_log(self) -> None:
        """Drop log lines of steps after the checkpoint (they are about to be redone)."""
        path = self.output_dir / LOG
        if path.is_file():
            keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= self.step]
            path.write_text("".join(ln + "\n" for ln in keep))

    @torch.no_grad()
    def fit_standardization(self, max_samples: int = 512) -> int:
        """Fit the projector's ``Standardize`` layers (``projector.standardize: true``) that are not fitted yet on
        the projector inputs of the first ``max_samples`` samples the run trains on (real tokens only, in the training
        precision, in fixed chunks: the same statistics on every run and every process). Returns tokens used."""
        from ..projectors import Standardize

        layers = [m for m in self.model.projector.modules() if isinstance(m, Standardize) and not bool(m.fitted)]
        if not layers:
            return 0
        captured: list[Tensor] = []
        hook = self.model.projector.register_forward_pre_hook(lambda mod, args: captured.append(args[0].detach()))
        rows = []
        try:  # the first samples (by index) the whole run trains on, on every process alike
            chosen = self.visited(0, self.total_steps, all_ranks=True)[:max_samples]
            n = len(chosen)
            for start in range(0, n, 32):
                images = [im for i in chosen[start:start + 32] for im in self.data[i].load_images()]
                if not images:
                    continue
                with self._autocast():
                    _, mask, _ = self.model.encode_images(images)
                x = captured.pop()
                rows.append(x[mask.to(x.device)].float() if mask is not None else x.flatten(0, 1).float())
        finally:
            hook.remove()
        if not rows:
            raise InputError("projector.standardize needs training samples with images; the first "
                             f"{max_samples} samples have none")
        feats = torch.cat(rows)
        for layer in layers:
            layer.fit(feats)
        self.log(f"projector input standardized on {feats.shape[0]} tokens of {n} training samples")
        return feats.shape[0]

    # ------------------------------------------------------------ checkpoints
    def _trainable_state(self) -> dict[str, Tensor]:
        return {n: p.detach().cpu().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/step-N`` atomically (rank 0; RNG states of every process) and prune old ones."""
        from safetensors.torch import save_file

        rngs = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(rngs, _rng_state())
        else:
            rngs = [_rng_state()]
        if self.rank != 0:
            dist.barrier()
            return None
        epoch, pos = divmod(self.step, self.steps_per_epoch)
        state = {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(), "rng": rngs,
                 "step": self.step, "losses": list(self.losses),
                 "data": {"seed": self.t["seed"], "epoch": epoch, "position": pos, "size": len(self.data),
                          "batch_size": self.t["batch_size"]}}
        meta = {"step": self.step, "total_steps": self.total_steps, "world_size": self.world,
                "trainable": self.names, "loss": self.losses[-1] if self.losses else None}

        def write(tmp: Path) -> None:
            save_file(self._trainable_state(), str(tmp / WEIGHTS))
            torch.save(state, tmp / STATE)
            (tmp / META).write_text(json.dumps(meta, indent=1))
            (tmp / CONFIG_FILE).write_text(dump_config(self.cfg))

        path = self.output_dir / CKPT_DIR / f"step-{self.step:07d}"
        try:
            write_dir_atomically(path, write)
        finally:
            if self.world > 1:
                dist.barrier()
        for old in list_checkpoints(self.output_dir)[:-max(1, self.t["keep_last"])]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    def _resume(self, resume: bool | str | os.PathLike) -> Path | None:
        if resume is True:
            found = list_checkpoints(self.output_dir)
            if not found:
                self.log(f"no checkpoint under {self.output_dir / CKPT_DIR}; starting from step 0")
                return None
            path = found[-1]
        else:
            path = Path(resume)
        weights, state, meta = load_checkpoint(path)
        diff = []
        if (path / CONFIG_FILE).is_file():
            import yaml

            diff = _config_diff(self.cfg, yaml.safe_load((path / CONFIG_FILE).read_text()))
        if diff:
            raise ConfigError(f"cannot resume from {path}: the config changed ({'; '.join(diff[:5])}); resume with "
                              "the recipe and overrides of the original run, or train into a new output_dir")
        data = state["data"]
        if data["size"] != len(self.data) or data["batch_size"] != self.t["batch_size"]:
            raise ConfigError(f"cannot resume from {path}: it was trained on {data['size']} samples in batches of "
                              f"{data['batch_size']}, now {len(self.data)} / {self.t['batch_size']}; use the same data")
        if meta.get("world_size", 1) != self.world:
            raise ConfigError(f"cannot resume from {path}: it was written by {meta.get('world_size')} processes, now "
                              f"{self.world}; resume with the same number of processes")
        mine = {n for n, p in self.model.named_parameters() if p.requires_grad}
        if set(weights) != mine:
            raise CheckpointError(f"{path} holds trainable weights {sorted(set(weights) ^ mine)[:4]} that do not "
                                  "match this model's; resume with the same recipe")
        self.model.load_state_dict(weights, strict=False)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"][self.rank])
        self.step, self.losses = int(state["step"]), list(state["losses"])
        self.log(f"resumed from {path} at step {self.step}/{self.total_steps}")
        return path

    # ------------------------------------------------------------ the loop
    def _epoch_order(self, epoch: int) -> list[int]:
        return torch.randperm(len(self.data), generator=torch.Generator().manual_seed(self.t["seed"] * 1009 + epoch)).tolist()

    def _indices(self, step: int, all_ranks: bool = False) -> list[int]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        B, share = self.t["batch_size"], self.t["batch_size"] // self.world
        batch = self._epoch_order(epoch)[pos * B:(pos + 1) * B]
        return batch if all_ranks else batch[self.rank * share:(self.rank + 1) * share]

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None)

    def train_step(self, step: int) -> float:
        """One optimizer step; returns the global mean loss."""
        idx = self._indices(step)
        micro = [idx[i:i + self.micro] for i in range(0, len(idx), self.micro)]
        with self._autocast():
            inputs = [self.model.prepare(b.conversations, b.images, with_labels=True)
                      for b in (collate([self.data[i] for i in m]) for m in micro)]
        counts = torch.tensor([float(sum(int((x.labels[:, 1:] != IGNORE_INDEX).sum()) for x in inputs))],
                              dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(counts)
        n_global, B = float(counts[0]), self.t["batch_size"]
        if n_global == 0:
            raise InputError(f"step {step}: the batch has no answer tokens; every record needs an assistant answer")
        stats = torch.zeros(2, dtype=torch.float64)  # [CE sum, weighted aux]
        for m, x in zip(micro, inputs):
            with self._autocast():
                ce, _, aux = loss_terms(self.model, x)
                loss = ce / n_global + (aux * (len(m) / B) if aux is not None else 0.0)
            loss.backward()
            stats[0] += float(ce.detach())
            stats[1] += float(aux.detach()) * len(m) / B if aux is not None else 0.0
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if self.world > 1:
            flat = torch.cat([g.reshape(-1).float() for g in grads])
            dist.all_reduce(flat)
            dist.all_reduce(stats)
            offset = 0
            for p, g in zip(self.params, grads):
                p.grad = flat[offset:offset + g.numel()].view_as(g).to(g.dtype)
                offset += g.numel()
        if self.t["max_grad_norm"] > 0:
            nn.utils.clip_grad_norm_(self.params, self.t["max_grad_norm"])
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return float(stats[0] / n_global + stats[1])

    def fit(self, resume: bool | str | os.PathLike = False, stop_at: int | None = None,
            export: bool = True, overwrite: bool = False) -> TrainResult:
        """Train to ``total_steps`` (or stop after step ``stop_at``, writing a checkpoint, as an interruption would);
        export the final model to ``output_dir/model`` with its config. A fresh run (no ``resume``) refuses an
        ``output_dir`` that holds checkpoints unless ``overwrite`` (which deletes them and the old log)."""
        self._check_writable()
        self._prepare_output_dir(resume, overwrite)
        self._setup()
        ckpt = self._resume(resume) if resume else None
        if ckpt is not None and self.rank == 0:
            self._truncate_log()
        if self.rank == 0:
            save_config(self.cfg, self.output_dir)
        skipped = skipped_records(self.data)
        if skipped:
            self.log(f"{skipped} malformed record(s) skipped while loading the training data")
        end = self.total_steps if stop_at is None else min(self.total_steps, stop_at)
        self._end = end
        self._setup_cache()
        self.fit_standardization()
        self.log(f"training {self.t['stage']}: {len(self.names)} trainable tensors "
                 f"({sum(p.numel() for p in self.params) / 1e6:.2f}M params), steps {self.step}->{end} of "
                 f"{self.total_steps}, batch {self.t['batch_size']} = {self.world} proc x "
                 f"{self.t['batch_size'] // self.world // self.micro} accum x {self.micro}, "
                 f"precision {'bf16' if self.autocast else 'fp32'} on {self.device}")
        from tqdm import tqdm

        bar = tqdm(total=end, initial=self.step, disable=not self.progress, unit="step", dynamic_ncols=True)
        t0, done0 = time.perf_counter(), self.step
        log_path = self.output_dir / LOG
        interrupted = False
        with _stop_on_sigint(self.log) as stop:
            while self.step < end:
                if self._stop_requested(stop):
                    interrupted = True
                    break
                self._one_step(bar, end, log_path)
                if self.t["save_every"] and self.step % self.t["save_every"] == 0 and self.step < end:
                    ckpt = self.save_checkpoint() or ckpt
        bar.close()
        elapsed = time.perf_counter() - t0
        if self.step > done0 or ckpt is None:
            ckpt = self.save_checkpoint() or ckpt
        if interrupted:
            self.log(f"interrupted at step {self.step} of {self.total_steps}; checkpoint {ckpt} written; continue "
                     f"with --resume (compactvl train RECIPE --resume)")
        model_dir = None
        if export and self.step >= self.total_steps and not interrupted:
            model_dir = self.export()
        steps_run = self.step - done0
        return TrainResult(losses=list(self.losses), steps=self.step, total_steps=self.total_steps,
                           samples_per_s=steps_run * self.t["batch_size"] / elapsed if steps_run else 0.0,
                           elapsed_s=elapsed, output_dir=self.output_dir, checkpoint=ckpt, model_dir=model_dir,
                           skipped_records=skipped, interrupted=interrupted,
                           cache={} if self.cache is None else {"images": len(self.cache), "hits": self.cache.hits,
                                                                 "misses": self.cache.misses})

    def _stop_requested(self, stop: "list[bool]") -> bool:
        """Whether Ctrl-C asked to stop; with several processes, whether any did (all stop after the same step)."""
        if self.world == 1:
            return stop[0]
        flag = torch.tensor([1.0 if stop[0] else 0.0])
        dist.all_reduce(flag)
        return bool(flag.item() > 0)

    def _one_step(self, bar, end: int, log_path: Path) -> None:
        ts = time.perf_counter()
        loss = self.train_step(self.step)
        self.step += 1
        self.losses.append(loss)
        took = time.perf_counter() - ts
        sps = self.t["batch_size"] / max(1e-9, took)
        if self.on_step is not None:
            self.on_step(self, took)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.sched.get_last_lr()[0]:.2e}", samples_s=f"{sps:.1f}")
        if self.rank == 0 and (self.step % self.t["log_every"] == 0 or self.step == end):
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": self.step, "loss": loss, "lr": self.sched.get_last_lr()[0],
                                    "samples_per_s": sps}) + "\n")

    def export(self) -> Path | None:
        """Merge LoRA adapters and write ``output_dir/model`` (CompactVLM.save_pretrained) + config.yaml (rank 0)."""
        merge_lora(self.model.lm)
        self.model.eval()
        path = None
        if self.rank == 0:
            path = self.model.save_pretrained(self.output_dir / MODEL_DIR)
            save_config(self.cfg, path)
        if self.world > 1:
            dist.barrier()
        return path

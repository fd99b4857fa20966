"""The training loop: stages ``align`` / ``sft``, AdamW with warmup + cosine, accumulation, clipping, mixed precision,
checkpoints with exact resume, the encoder-feature cache and data parallelism — each a component of its own module
(``checkpoint``, ``feature_cache``, ``parallel``, ``trainable``, ``standardize``) that :class:`Trainer` drives.

What a step does (global batch B = ``train.batch_size`` samples, split over P processes and micro-batches):

    order  = randperm(len(data), seed + epoch)            # data order is a pure function of (seed, epoch, step)
    batch  = order[pos·B : (pos+1)·B]; process r takes its contiguous B/P share, in micro-batches
    loss   = Σ_tokens CE / N_global + aux                 # N_global: answer tokens in the whole global batch
    grads  = DDP sum over processes (Σ micro-batch grads) → clip → AdamW → LR schedule

The loss is the model's own (``CompactVLM.forward`` → ``VLMOutput.ce_sum`` / ``aux_loss``, with LM-head logits only
for rows that have a target: the LM head over a 49k vocabulary is a fifth of SmolLM2's compute). Normalizing by the
global token count (not a mean of per-process means) makes a P-process run compute the same gradient as one process
with the same global batch, and makes accumulation exact.

Stages: ``align`` trains the projector (and learnable token ops); ``sft`` also trains the LM, fully or with LoRA
(peft adapters injected in place, merged into the weights on export). Encoders stay frozen unless
``train.train_encoders``. ``fit(resume=True)`` continues from the latest checkpoint to the same weights and losses as
an uninterrupted run.
"""
from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from ..atomic import remove_stale, write_file_atomically
from ..config import CONFIG_FILE, dump_config, save_config
from ..data import sample_location
from ..data.collate import collate
from ..device import resolve_precision
from ..errors import ConfigError, InputError
from ..processor import IGNORE_INDEX
from .checkpoint import Checkpoints, seed_everything
from .feature_cache import FeatureCache, cache_for_training
from .factories import skipped_records
from .parallel import Parallel
from .standardize import fit_standardization
from .trainable import configure_trainable, merge_lora, param_groups

MODEL_DIR = "model"
LOG = "train_log.jsonl"


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


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
    aux_losses: list = field(default_factory=list)  # the auxiliary part of each loss (balance, SIP); None: not recorded
    interrupted: bool = False  # Ctrl-C (SIGINT) stopped it after a whole step; the checkpoint holds that step


class Trainer:
    """``Trainer(model, train_data, cfg).fit(resume=False)``. ``cfg`` is a resolved config (compactvl.config);
    ``cfg["train"]`` drives the loop. Data parallel when launched on several processes (``accelerate launch`` /
    ``torchrun``; each process builds the same model and data and calls fit)."""

    def __init__(self, model, train_data: Dataset, cfg: dict, output_dir: str | os.PathLike | None = None,
                 progress: bool = True, log: Callable[[str], None] = print,
                 on_step: Callable[["Trainer", float], None] | None = None, feature_cache: FeatureCache | None = None):
        self.model, self.data, self.cfg, self.t = model, train_data, cfg, cfg["train"]
        self.shared_cache = feature_cache  # a cache shared with earlier runs on the same images (demo --compare)
        self.on_step = on_step  # called after every optimizer step with (trainer, seconds the step took)
        self.encode_seconds_per_image: float | None = None  # measured while the feature cache is filled
        self.output_dir = Path(output_dir or cfg["output_dir"])
        self.device = model.device
        self.parallel = Parallel(self.device)
        self.rank, self.world = self.parallel.rank, self.parallel.world
        self.checkpoints = Checkpoints(self.output_dir, self.parallel, self.t["keep_last"])
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
        self.autocast = resolve_precision(t["precision"], self.device)
        self.losses: list[float] = []
        self.aux_losses: list[float | None] = []  # the auxiliary part of each step's loss (0.0 without aux terms)
        self._last_aux, self.step = 0.0, 0
        self.cache: FeatureCache | None = None
        # a shared cache's hits and misses before this run; seconds spent filling the cache (encoding the images)
        self._cache_counts, self._cache_seconds = (0, 0), 0.0
        self._end = self.total_steps  # the step fit() stops at (it sets it)

    def log(self, msg: str) -> None:
        if self.rank == 0 and self._log is not None:
            self._log(msg)

    # ------------------------------------------------------------ setup
    def _check_writable(self) -> None:
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            probe = self.output_dir / f".write-test.tmp-{os.getpid()}"  # a temp name remove_stale knows
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
        self.opt = torch.optim.AdamW(param_groups(self.model, t), lr=t["lr"], betas=tuple(t["betas"]))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, self.total_steps, self.warmup, t["min_lr_ratio"]))
        self.model.train()
        self.model.encoders.train(bool(t["train_encoders"]))
        self.ddp = self.parallel.wrap(self.model)  # after LoRA injection: the trainable parameters are final

    def _setup_cache(self) -> None:
        if self.t["train_encoders"]:
            return
        indices = self.visited(self.step, self._end)  # only what this run will train on (max_steps bounds it)
        c = self.shared_cache  # the result reports this run's hits and misses, not a shared cache's earlier ones
        self._cache_counts = (c.hits, c.misses) if c is not None else (0, 0)
        t0 = time.perf_counter()
        self.cache, self.encode_seconds_per_image = cache_for_training(
            self.model, self.data, indices, self.t["feature_cache"], self.t["feature_cache_gb"],
            batch_size=max(self.micro, 16), autocast=self._autocast, progress=self.progress, log=self.log,
            cache=self.shared_cache)
        self._cache_seconds = time.perf_counter() - t0

    def visited(self, start: int, end: int, all_ranks: bool = False) -> list[int]:
        """The sample indices trained on in steps ``start..end-1`` (by this process, or by all with ``all_ranks``),
        sorted and each once: what the feature cache encodes, so a short run (``max_steps``) never touches the rest
        of the training set."""
        return sorted({i for step in range(start, end) for i in self._indices(step, all_ranks)})

    def _prepare_output_dir(self, resume: bool | str | os.PathLike, overwrite: bool) -> None:
        if resume:
            return
        old = self.checkpoints.list()
        if old and not overwrite:
            raise ConfigError(f"{self.output_dir} already holds checkpoints (latest {old[-1].name}); continue them "
                              "with --resume, or train into a new --output_dir, or delete them with --overwrite (in "
                              "Python: fit(resume=True) / fit(overwrite=True))")
        self.parallel.barrier()  # every process has looked before rank 0 deletes anything
        if self.rank == 0:
            self.checkpoints.clear()
            (self.output_dir / LOG).unlink(missing_ok=True)

    def _remove_stale(self) -> None:
        """Remove what a killed earlier run left (rank 0): temp directories of checkpoint and model writes, and
        temp files, whose process is gone."""
        if self.rank == 0:
            for gone in remove_stale(self.output_dir) + self.checkpoints.remove_stale():
                self.log(f"removed {gone}, left by a process that is gone")

    def _truncate_log(self) -> None:
        """Cut the log back to the resumed step (0 without a checkpoint): drop lines of later steps (they are about
        to be redone), repeated steps, and unreadable lines (a torn last line from a kill while it was written)."""
        path = self.output_dir / LOG
        if not path.is_file():
            return
        keep, seen, torn = [], set(), 0
        for ln in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                step = json.loads(ln)["step"]
            except (ValueError, KeyError, TypeError):
                step, torn = None, torn + bool(ln.strip())
            if isinstance(step, int) and step <= self.step and step not in seen:
                keep.append(ln)
                seen.add(step)
        write_file_atomically(path, "".join(ln + "\n" for ln in keep))
        if torn:
            self.log(f"dropped {torn} unreadable line(s) from {path} (written when a run was killed)")

    def fit_standardization(self, max_samples: int = 512) -> int:
        """Fit the projector's ``Standardize`` layers (``projector.standardize: true``) that are not fitted yet on
        the projector inputs of the first ``max_samples`` samples the run trains on (by index, on every process
        alike; in the training precision). Returns tokens used."""
        chosen = self.visited(0, self.total_steps, all_ranks=True)[:max_samples]
        return fit_standardization(self.model, self.data, chosen, autocast=self._autocast, log=self.log)

    # ------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/step-N`` atomically (rank 0; RNG states of every process) and prune old ones."""
        epoch, pos = divmod(self.step, self.steps_per_epoch)
        state = {"losses": list(self.losses), "aux_losses": list(self.aux_losses),
                 "data": {"seed": self.t["seed"], "epoch": epoch, "position": pos, "size": len(self.data),
                          "batch_size": self.t["batch_size"]}}
        meta = {"total_steps": self.total_steps, "trainable": self.names,
                "loss": self.losses[-1] if self.losses else None}
        return self.checkpoints.save(self.step, self.model, self.opt, self.sched, state, meta, self.cfg)

    def _resume(self, resume: bool | str | os.PathLike) -> Path | None:
        path, loaded, skipped = self.checkpoints.find(resume)
        for bad, why in skipped:
            self.log(f"skipped checkpoint {bad.name}: {why}")
        if path is None:
            self.log(f"no checkpoint under {self.checkpoints.output_dir / 'checkpoints'}; starting from step 0")
            return None
        state = self.checkpoints.restore(path, loaded, self.cfg, self.model, self.opt, self.sched,
                                         {"size": len(self.data), "batch_size": self.t["batch_size"]})
        self.step, self.losses = int(state["step"]), list(state["losses"])
        # a checkpoint written before aux losses were recorded lacks them: unknown (None) for its steps
        self.aux_losses = list(state.get("aux_losses") or [None] * len(self.losses))
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
            inputs = [self._prepare(step, m) for m in micro]
        counts = torch.tensor([float(sum(int((x.labels[:, 1:] != IGNORE_INDEX).sum()) for x in inputs))],
                              dtype=torch.float64)
        n_global, B = float(self.parallel.sum(counts)[0]), self.t["batch_size"]
        if n_global == 0:
            raise InputError(f"step {step + 1}: the batch has no answer tokens; every record needs an assistant answer")
        stats = torch.zeros(2, dtype=torch.float64)  # [CE sum, weighted aux]
        for k, (m, x) in enumerate(zip(micro, inputs)):
            with self.parallel.sync(self.ddp, last=k == len(micro) - 1):
                with self._autocast():
                    try:
                        out = self.ddp(x, return_logits=False)  # the model's forward: CE sum, token count, aux loss
                    except InputError as e:
                        raise InputError(f"step {step + 1}: {self._culprit(m, e)}") from None
                    aux = out.aux_loss
                    loss = out.ce_sum / n_global + (aux * (len(m) / B) if aux is not None else 0.0)
                loss.backward()
            stats[0] += float(out.ce_sum.detach())
            stats[1] += float(aux.detach()) * len(m) / B if aux is not None else 0.0
        stats = self.parallel.sum(stats)
        self._last_aux = float(stats[1])
        if self.t["max_grad_norm"] > 0:
            nn.utils.clip_grad_norm_(self.params, self.t["max_grad_norm"])
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return float(stats[0] / n_global + stats[1])

    def _prepare(self, step: int, indices: list[int]):
        """Model inputs for these samples; a data error names the step and the sample's file, record and id."""
        samples = [self.data[i] for i in indices]  # a LLaVA file's own errors already name file, record and id
        try:
            b = collate(samples)
            return self.model.prepare(b.conversations, b.images, with_labels=True)
        except InputError as e:
            raise InputError(f"step {step + 1}: {self._culprit(indices, e)}") from None

    @torch.no_grad()
    def _culprit(self, indices: list[int], error: InputError) -> str:
        """The first sample of ``indices`` that fails alone (prepared and run through the model), named by file,
        record and id, with its own error; all of them when none fails alone."""
        for i in indices:
            try:
                one = collate([self.data[i]])
                self.model(self.model.prepare(one.conversations, one.images, with_labels=True), return_logits=False)
            except InputError as e:
                return f"{sample_location(self.data, i)}: {e}"
        return f"{', '.join(sample_location(self.data, i) for i in indices)}: {error}"

    def fit(self, resume: bool | str | os.PathLike = False, stop_at: int | None = None,
            export: bool = True, overwrite: bool = False) -> TrainResult:
        """Train to ``total_steps`` (or stop after step ``stop_at``, writing a checkpoint, as an interruption would);
        export the final model to ``output_dir/model`` with its config. A fresh run (no ``resume``) refuses an
        ``output_dir`` that holds checkpoints unless ``overwrite`` (which deletes them and the old log)."""
        self._check_writable()
        self._remove_stale()
        self._prepare_output_dir(resume, overwrite)
        self._setup()
        ckpt = self._resume(resume) if resume else None
        if resume and self.rank == 0:  # also without a checkpoint: a run killed before its first one logged steps
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
        bar = tqdm(total=end, initial=self.step, disable=not self.progress, unit="step", dynamic_ncols=True)
        t0, done0 = time.perf_counter(), self.step
        log_path = self.output_dir / LOG
        interrupted = False
        with _stop_on_sigint(self.log) as stop:
            while self.step < end:
                if self.parallel.any(stop[0]):  # with several processes: all stop after the same step
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
                           skipped_records=skipped, interrupted=interrupted, aux_losses=list(self.aux_losses),
                           cache={} if self.cache is None else {
                               "images": len(self.cache), "hits": self.cache.hits - self._cache_counts[0],
                               "misses": self.cache.misses - self._cache_counts[1], "seconds": self._cache_seconds})

    def _one_step(self, bar, end: int, log_path: Path) -> None:
        ts = time.perf_counter()
        loss = self.train_step(self.step)
        self.step += 1
        self.losses.append(loss)
        self.aux_losses.append(self._last_aux)
        took = time.perf_counter() - ts
        sps = self.t["batch_size"] / max(1e-9, took)
        if self.on_step is not None:
            self.on_step(self, took)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.sched.get_last_lr()[0]:.2e}", samples_s=f"{sps:.1f}")
        if self.rank == 0 and (self.step % self.t["log_every"] == 0 or self.step == end):
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": self.step, "loss": loss, "aux_loss": self._last_aux,
                                    "lr": self.sched.get_last_lr()[0], "samples_per_s": sps}) + "\n")

    def export(self) -> Path | None:
        """Merge LoRA adapters and write ``output_dir/model`` (CompactVLM.save_pretrained) + config.yaml (rank 0)."""
        merge_lora(self.model.lm)
        self.model.eval()
        path = None
        if self.rank == 0:
            path = self.model.save_pretrained(self.output_dir / MODEL_DIR,
                                              extra_files={CONFIG_FILE: dump_config(self.cfg)})  # in the manifest
        self.parallel.barrier()
        return path

"""One cell of ``compactvl bench`` (method × visual count × batch): its inputs and Runner, warm-up and timed runs, the
statistics of the timings and the result row (definitions in :mod:`compactvl.bench` and docs/benchmarks.md)."""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import ConfigError
from ..measure.counted import CountingPolicy, per_sample_schedules, schedule_mismatch
from ..measure.macs import Schedule, llm_macs, load_schedules, schedule_for
from ..runner import Runner
from .memory import MemoryProbe
from .methods import MethodSpec
from .model import BenchModel, make_inputs


def stats(samples: Sequence[float]) -> dict:
    """median, quartiles (linear interpolation), IQR, min, max, n and the samples (ms)."""
    a = np.asarray(samples, dtype=float)
    q1, med, q3 = (float(x) for x in np.percentile(a, [25, 50, 75]))
    return dict(median=med, q1=q1, q3=q3, iqr=q3 - q1, min=float(a.min()), max=float(a.max()), n=int(a.size),
                samples=[float(x) for x in a])


@dataclass
class BenchSettings:
    visual: list[int] = field(default_factory=lambda: [576])
    text: int = 64
    prefix: int = 8
    batch: list[int] = field(default_factory=lambda: [1])
    warmup: int = 1
    repeats: int = 5
    decode_tokens: int = 8
    seed: int = 0
    isolate: bool = False
    threads: int | None = None
    op_width: int = 1024  # --op: channels of the synthetic visual tokens (the encoder width)
    op_limit: float = 3.0  # --op: flag ops whose time exceeds this percentage of the uncompressed prefill

    def check(self) -> None:
        for name, xs in (("visual", self.visual), ("batch", self.batch)):
            if not xs or any(not isinstance(x, int) or x < (0 if name == "visual" else 1) for x in xs):
                raise ConfigError(f"--{name} needs whole numbers {'>= 0' if name == 'visual' else '>= 1'}, e.g. "
                                  f"--{name} {'576,2880' if name == 'visual' else '1,8'}; got {xs!r}")
        if self.text < 1:
            raise ConfigError(f"--text must be >= 1 (got {self.text}): the first token follows the last text token")
        if self.repeats < 1 or self.warmup < 1:
            raise ConfigError(f"--repeats and --warmup must be >= 1 (got {self.repeats}, {self.warmup}); the "
                              f"warm-up run also checks the token schedule")
        if self.decode_tokens < 0:
            raise ConfigError(f"--decode-tokens must be >= 0, got {self.decode_tokens}")
        if self.prefix < 0:
            raise ConfigError(f"--prefix must be >= 0, got {self.prefix}")
        self.prefix = min(self.prefix, self.text - 1)  # at least one text token follows the image


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _analytic_schedule(method: MethodSpec, policies: list, num_layers: int, visual: int, text: int) -> Schedule | None:
    """The method's schedule from ``measure.macs`` (None where no builder can express it: count/threshold modes,
    several policies, or a policy without a registered schedule)."""
    if method.kind == "vanilla":
        return schedule_for("vanilla", num_layers, visual, text)
    if method.kind == "pre_llm":
        return schedule_for("keep", num_layers, visual, text, keep=method.keep)
    if method.keep is not None or len(policies) != 1:
        return None
    name = method.policies[0]["policy"]  # "model" stands for the loaded model's recipe
    knobs_fn = getattr(policies[0], "schedule_knobs", None)
    if knobs_fn is None or name not in load_schedules():  # the policies' own schedules included
        return None
    try:
        knobs = knobs_fn()
    except ConfigError:
        return None
    return schedule_for(name, num_layers, visual, text, **knobs)


class Measurement:
    """One cell (method, visual count, batch size): its inputs and Runner, warm-up runs, timed runs, and the result row.

    Cells of one (visual, batch) group are interleaved by :func:`~compactvl.bench.sweep.run_bench` (repeat r of every
    method, then repeat r + 1), so a load change on a shared machine hits every method alike instead of whichever ran
    at that moment.
    """

    def __init__(self, model: BenchModel, method: MethodSpec, visual: int, batch: int, settings: BenchSettings):
        self.model, self.method, self.visual, self.batch, self.settings = model, method, visual, batch, settings
        self.policies = method.build_policies()
        self.runner = Runner(model.lm, self.policies, model.position_policy)  # checks knobs against the model
        self.entering = method.visual_entering(visual)
        self.embeds, self.vmask = make_inputs(model.lm, self.entering, settings.text, settings.prefix, batch,
                                              settings.seed)
        self.position_ids = None
        if model.position_axes:  # M-RoPE: every axis counts 0..L-1, shaped [k, B, L] as the model expects
            B, L = self.embeds.shape[:2]
            self.position_ids = torch.arange(L, device=self.embeds.device).expand(model.position_axes, B, L)
        self.counter = CountingPolicy()
        self.probe = MemoryProbe(model.device, settings.isolate)
        self.prefill_ms: list[float] = []
        self.decode_ms: list[float] = []
        self.score_ms: list[float] = []
        self.memory: dict | None = None
        self.warmed = 0

    def _prefill(self, extra=()):
        out = self.runner.prefill(self.embeds, None, self.vmask, self.position_ids, use_cache=True,
                                  policies=[*self.policies, *extra])
        return out, self.runner.logits(out.hidden[:, -1]).argmax(-1)

    def _decode(self, cache, nxt, times: list[float] | None) -> None:
        dev, runner = self.model.device, self.runner
        for _ in range(self.settings.decode_tokens):
            _sync(dev)
            t0 = time.perf_counter()
            step = runner.extend(runner.embed(nxt[:, None]), cache)
            nxt = runner.logits(step.hidden[:, -1]).argmax(-1)
            _sync(dev)
            if times is not None:
                times.append((time.perf_counter() - t0) * 1e3)

    @torch.inference_mode()
    def warmup(self) -> None:
        """An untimed run; the first one carries the CountingPolicy (tokens entering each layer)."""
        out, nxt = self._prefill([self.counter] if self.warmed == 0 else ())
        self._decode(out.cache, nxt, None)
        self.warmed += 1

    @torch.inference_mode()
    def timed(self) -> None:
        """One timed prefill and its decode steps; peak memory is read over this run."""
        if not self.warmed:
            raise ConfigError("run at least one warm-up before a timed run (it also counts the schedule)")
        dev = self.model.device
        gc.collect()  # what earlier runs left (KV caches) should not count in this run's peak
        self.probe.start()
        _sync(dev)
        t0 = time.perf_counter()
        out, nxt = self._prefill()
        _sync(dev)
        self.prefill_ms.append((time.perf_counter() - t0) * 1e3)
        score = [p.score_seconds for p in self.policies if hasattr(p, "score_seconds")]
        if score:
            self.score_ms.append(sum(score) * 1e3)
        self._decode(out.cache, nxt, self.decode_ms)
        del out
        mem = self.probe.stop()
        if self.memory is None or mem["peak_mb"] > self.memory["peak_mb"]:
            self.memory = mem

    def result(self) -> dict:
        method, settings, lm = self.method, self.settings, self.model.lm
        measured = per_sample_schedules(self.counter, visual_input=self.visual)
        analytic = _analytic_schedule(method, self.policies, lm.config.num_hidden_layers, self.visual, settings.text)
        mismatch = None
        if analytic is not None:
            mismatch = next((m for m in (schedule_mismatch(s, analytic) for s in measured) if m), None)
        schedule = analytic if analytic is not None else replace(measured[0], method=method.name)
        macs = llm_macs(lm.config, schedule, name=self.model.name)
        p = stats(self.prefill_ms)
        d = stats(self.decode_ms) if self.decode_ms else None
        s = stats(self.score_ms) if self.score_ms else None
        b = self.batch
        return dict(
            method=method.label, name=method.name, kind=method.kind, visual_input=self.visual,
            visual_entering=self.entering, text=settings.text, batch=b,
            prefill_ms=p, decode_ms_per_token=d,
            score_ms=s, score_share=(s["median"] / p["median"]) if s else None,
            throughput=dict(prefill_samples_per_s=b / (p["median"] / 1e3),
                            decode_tokens_per_s=(b / (d["median"] / 1e3)) if d else None),
            memory=self.memory,
            macs=dict(llm_macs=macs.llm_macs, vanilla_llm_macs=macs.vanilla_llm_macs, ratio=macs.ratio,
                      lm_head_macs=macs.lm_head_macs, ideal_speedup=1.0 / macs.ratio),
            schedule=dict(source="analytic" if analytic is not None else "counted",
                          tokens=schedule.tokens, visual=schedule.visual,
                          counted_tokens=measured[0].tokens, counted_visual=measured[0].visual,
                          matches=None if analytic is None else mismatch is None, mismatch=mismatch),
            speedup=None, efficiency=None,
        )


def run_one(model: BenchModel, method: MethodSpec, visual: int, batch: int, settings: BenchSettings,
            tick: Callable[[], None] = lambda: None) -> dict:
    """Measure one cell on its own (warm-ups, then the timed repeats). ``tick`` runs after every run."""
    gc.collect()
    cell = Measurement(model, method, visual, batch, settings)
    for _ in range(settings.warmup):
        cell.warmup()
        tick()
    for _ in range(settings.repeats):
        cell.timed()
        tick()
    return cell.result()

"""Measured speed and memory of an LM prefill and decode under token-reduction methods (``compactvl bench``).

What is measured, for each method × visual-token count × batch size (definitions also in docs/benchmarks.md and in
every report's ``definitions``):

* **prefill_ms** (time to first token): ``Runner.prefill`` over the whole prompt with the KV cache on, plus the LM head
  on the last position and the argmax that picks the first token. Inputs are ready-made embeddings (the vision side is
  not timed), so this is the LM side of the time to first token. Median (and quartiles) of ``repeats`` timed runs
  after ``warmup`` untimed ones; ``time.perf_counter`` around each run, with ``torch.cuda.synchronize`` before and
  after it on CUDA. The methods of one (visual, batch) group are interleaved (repeat r of every method, then repeat
  r + 1), so that load from other processes on a shared machine falls on all of them alike.
* **decode_ms_per_token**: median over every decode step of every repeat (``decode_tokens`` steps after each timed
  prefill, each ``Runner.extend`` by one token + LM head + argmax, same synchronisation). Pruned methods decode over
  a shorter cache.
* **throughput**: ``batch / prefill_s`` samples per second (prefill throughput) and ``batch / decode_step_s`` tokens per
  second (decode throughput).
* **memory** (the largest peak over the timed runs; each run: reset, prefill + decode, read): on CUDA
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; on CPU the process's peak resident set
  (Linux ``VmHWM``), reset by writing 5 to ``/proc/self/clear_refs``. CPU RSS includes the weights, the inputs of the
  interleaved methods and whatever the allocator kept from earlier runs, so without ``isolate`` it depends on what
  ran before; ``isolate=True`` runs each cell alone in a fresh process (no interleaving) so that it does not. Where
  the reset is impossible the report says ``ru_maxrss`` (a process high-water mark that cannot go down).
* **macs**: the analytic LLM MACs (``measure.macs.llm_macs``) of the method's schedule and the ratio to vanilla's;
  ``ideal_speedup`` = 1 / ratio, ``speedup`` = vanilla prefill median / this prefill median (same visual count and
  batch), ``efficiency`` = speedup / ideal_speedup (1.0: time fell exactly as MACs did).
* **schedule check**: one warm-up run carries a :class:`~compactvl.measure.counted.CountingPolicy`; the tokens that
  really entered each layer (per sample) must equal the analytic schedule (``schedule.matches``).
* **score_ms**: time the in-LLM pruning policies spent scoring and selecting (``ScorePolicy.score_seconds``), and its
  share of the prefill. On CUDA it is host time (not synchronised), an underestimate.

Methods (``parse_method``): ``vanilla``; ``keep:F`` (a pre-LLM token op keeping fraction F of the visual tokens: the LM
simply receives ``kept(V, F)`` visual tokens); ``NAME:knob=value,...`` for any registered LayerPolicy (``fastv``,
``pyramiddrop``, ``sparsevlm``, ...; values are JSON, lists as ``[7,14,21]`` or ``7/14/21``); a JSON recipe
``{"policy": "fastv", "layer": 2, "keep": 0.5}``; and with a loaded CompactVLM, ``model`` (its configured policies).
"""
from __future__ import annotations

import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, InputError
from .counted import CountingPolicy, per_sample_schedules, schedule_mismatch
from .macs import DEFINITION, SCHEDULES, Schedule, get_lm_config, kept, llm_macs, lm_shape, schedule_for
from .presets import LM_PRESETS

SCHEMA_ID = "compactvl.bench/1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFINITIONS = {
    "prefill_ms": "time to first token on the LM side: Runner.prefill (KV cache on) + LM head on the last position + "
                  "argmax, inputs given as embeddings; median and quartiles of the timed repeats after warm-up; "
                  "perf_counter, CUDA synchronised before and after each run; methods interleaved per repeat "
                  "unless isolated",
    "decode_ms_per_token": "one Runner.extend step (1 token, cache on) + LM head + argmax; median over all steps of "
                           "all repeats",
    "throughput": "prefill: batch / prefill seconds (samples/s); decode: batch / decode-step seconds (tokens/s)",
    "memory": "largest peak over the timed runs (each run: reset, run, read): CUDA max_memory_allocated after "
              "reset_peak_memory_stats; CPU peak RSS (VmHWM reset through /proc/self/clear_refs), which includes "
              "weights and allocator caches; see memory.method",
    "macs": DEFINITION,
    "speedup": "vanilla prefill median / method prefill median, same visual tokens and batch",
    "ideal_speedup": "vanilla LLM MACs / method LLM MACs = 1 / macs.ratio",
    "efficiency": "speedup / ideal_speedup (1 = time falls exactly as MACs do)",
    "score_ms": "time in-LLM policies spent scoring and selecting tokens (ScorePolicy.score_seconds), host clock",
}


# ----------------------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class MethodSpec:
    """One method to benchmark: a pre-LLM keep fraction and/or in-LLM policy recipes."""

    label: str
    name: str  # vanilla | keep | model | a registered policy name
    keep: float | None = None  # pre-LLM fraction of visual tokens (None: all)
    policies: tuple[dict, ...] = ()  # build_policy recipes

    @property
    def kind(self) -> str:
        return "vanilla" if self.name == "vanilla" else "pre_llm" if not self.policies else "in_llm"

    def visual_entering(self, visual: int) -> int:
        """Visual tokens the LM receives for ``visual`` input tokens (after the pre-LLM keep)."""
        return visual if self.keep is None else kept(visual, self.keep)

    def build_policies(self) -> list:
        if not self.policies:
            return []
        from ..policies import build_policy

        return [build_policy(dict(p)) for p in self.policies]

    def to_dict(self) -> dict:
        return dict(label=self.label, name=self.name, kind=self.kind, keep=self.keep,
                    policies=[dict(p) for p in self.policies])


def _split_top(text: str, sep: str = ",") -> list[str]:
    """Split at ``sep`` outside brackets."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{("
        depth -= ch in "]})"
        if ch == sep and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [s.strip() for s in out if s.strip()]


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        pass
    if "/" in text:
        return [_value(t) for t in text.split("/") if t]
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    return text


def _known_methods() -> list[str]:
    from ..registry import POLICIES

    return ["vanilla", "keep", *POLICIES.names()]


def parse_method(spec: str | dict, model_policies: Sequence[dict] | None = None) -> MethodSpec:
    """Parse a method spec (grammar in the module docstring). ``model_policies``: the loaded model's recipes, which
    the name ``model`` stands for."""
    if isinstance(spec, str) and spec.strip().startswith("{"):
        try:
            spec = json.loads(spec)
        except ValueError as e:
            raise ConfigError(f"method {spec!r} starts with '{{' but is not valid JSON ({e}); write e.g. "
                              f"'{{\"policy\": \"fastv\", \"layer\": 2, \"keep\": 0.5}}'") from None
    if isinstance(spec, dict):
        d = dict(spec)
        label = str(d.pop("label", "") or json.dumps(spec, sort_keys=True, separators=(",", ":")))
        if "policy" in d:
            return MethodSpec(label=label, name=str(d["policy"]), policies=(d,))
        name = d.pop("method", None)
        if name == "vanilla" and not d:
            return MethodSpec(label=label, name="vanilla")
        if name == "keep" and set(d) == {"keep"}:
            return MethodSpec(label=label, name="keep", keep=_keep_fraction(d["keep"], label))
        raise ConfigError(f"method recipe {spec!r} is not understood; give {{'policy': NAME, knobs...}}, "
                          f"{{'method': 'keep', 'keep': 0.25}} or {{'method': 'vanilla'}}")
    text = str(spec).strip().replace(" ", "")
    if not text:
        raise ConfigError("empty method; give e.g. vanilla, keep:0.25 or fastv:layer=2,keep=0.5")
    name, _, body = text.partition(":")
    if name == "vanilla":
        if body:
            raise ConfigError(f"vanilla takes no knobs, got '{body}'")
        return MethodSpec(label=text, name="vanilla")
    if name == "keep":
        value = body.split("=", 1)[1] if body.startswith("keep=") else body
        return MethodSpec(label=text, name="keep", keep=_keep_fraction(_value(value) if value else None, text))
    if name == "model":
        if model_policies is None:
            raise ConfigError("method 'model' (the loaded model's own layer policies) needs --model DIR")
        if body:
            raise ConfigError(f"method 'model' takes no knobs, got '{body}'; give the policy as NAME:knob=value")
        return MethodSpec(label="model", name="model", policies=tuple(dict(p) for p in model_policies))
    known = _known_methods()
    if name not in known:
        raise ConfigError(f"unknown method '{name}'; known: {', '.join(known)}"
                          + (", model" if model_policies is not None else "")
                          + ". Write NAME:knob=value,... e.g. fastv:layer=2,keep=0.5")
    recipe: dict[str, Any] = {"policy": name}
    for item in _split_top(body):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"method '{text}': '{item}' is not knob=value; write e.g. {name}:layer=2,keep=0.5 "
                              f"(lists as [7,14,21] or 7/14/21)")
        recipe[key] = _value(value)
    return MethodSpec(label=text, name=name, policies=(recipe,))


def _keep_fraction(x: Any, label: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 < float(x) <= 1:
        raise ConfigError(f"method '{label}': the keep fraction must be a number in (0, 1], e.g. keep:0.25")
    return float(x)


# ----------------------------------------------------------------------------------------------- the model
@dataclass
class BenchModel:
    lm: nn.Module
    name: str
    source: str  # preset | config | compactvl
    model_policies: list[dict] | None = None  # a CompactVLM's configured policies
    position_policy: str = "keep"
    position_axes: int = 0  # 3 for M-RoPE LMs (position ids [3, B, L]), else 0 ([B, L])

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.lm.parameters()).dtype

    def describe(self) -> dict:
        c = self.lm.config
        return dict(name=self.name, source=self.source, model_type=c.model_type, num_layers=c.num_hidden_layers,
                    hidden_size=c.hidden_size, parameters=sum(p.numel() for p in self.lm.parameters()),
                    dtype=str(self.dtype).replace("torch.", ""), device=str(self.device),
                    attn_implementation=getattr(c, "_attn_implementation", None),
                    position_policy=self.position_policy,
                    weights="random" if self.source in ("preset", "config") else "loaded")


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available in this torch build; use --device cpu")
    return dev


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype '{dtype}'; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_bench_model(llm: str | None = None, model_dir: str | None = None, device: str | None = None,
                     dtype: str | None = None, seed: int = 0, attn: str = "sdpa",
                     position_policy: str = "keep", vlm: str | None = None) -> BenchModel:
    """``llm``: an LM preset or config path, built with random weights (seeded); ``model_dir``: a saved CompactVLM;
    or ``vlm``: a transformers VLM directory or hub id of a family compactvl adapts (``compactvl.adapters``). A loaded
    model's language model is benchmarked with synthetic visual embeddings (its own weights; its vision tower is not
    timed). M-RoPE models (Qwen-VL) get the same position on their three axes: the cost does not depend on values."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if sum(x is not None for x in (llm, model_dir, vlm)) != 1:
        raise ConfigError("give exactly one of --llm PRESET|PATH (random weights), --model DIR (a saved compactvl "
                          "model) or --vlm PATH|HUB_ID (a transformers VLM)")
    if vlm is not None:
        from ..compression import load_compressed

        cvlm = load_compressed(vlm, None, dtype=dt, device=dev, attn_implementation=attn, load_processor=False)
        return BenchModel(cvlm.lm.eval(), str(vlm), "transformers", position_policy=position_policy,
                          position_axes=3 if cvlm.adapter.mrope else 0)
    if model_dir is not None:
        from ..model import CompactVLM

        vlm = CompactVLM.from_pretrained(model_dir, attn_implementation=attn)
        lm = vlm.lm.to(device=dev, dtype=dt).eval()
        return BenchModel(lm, str(model_dir), "compactvl", [dict(p) for p in vlm.config.policies],
                          vlm.config.position_policy)
    from transformers import AutoModelForCausalLM

    config = get_lm_config(llm)
    lm_shape(config)  # a supported decoder type, or a ConfigError naming the fix
    torch.manual_seed(seed)
    with torch.device(dev):
        lm = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dt)
    return BenchModel(lm.eval(), str(llm), "preset" if str(llm).lower() in LM_PRESETS else "config",
                      position_policy=position_policy)


# ----------------------------------------------------------------------------------------------- inputs
def make_inputs(lm: nn.Module, visual: int, text: int, prefix: int, batch: int, seed: int = 0):
    """Synthetic prompt embeddings ``[B, prefix + visual + (text - prefix), D]``: random token ids embedded by the
    LM, with ``visual`` random vectors (scaled like the embedding table) after the first ``prefix`` text tokens.
    Returns (embeds, visual_mask)."""
    if text < 1:
        raise InputError("--text must be >= 1: the first token is predicted from the last text token")
    if not 0 <= prefix < text:
        raise InputError(f"prefix {prefix} must be in 0..text-1 ({text - 1}): at least one text token follows the image")
    emb = lm.get_input_embeddings()
    gen = torch.Generator().manual_seed(seed)
    vocab = emb.weight.shape[0]
    ids = torch.randint(0, vocab, (batch, text), generator=gen)
    with torch.no_grad():
        text_emb = emb(ids.to(emb.weight.device))
        scale = float(emb.weight[:4096].float().std())
        vis = (torch.randn(batch, visual, text_emb.shape[-1], generator=gen) * scale).to(text_emb)
    embeds = torch.cat([text_emb[:, :prefix], vis, text_emb[:, prefix:]], dim=1)
    vmask = torch.zeros(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
    vmask[:, prefix:prefix + visual] = True
    return embeds, vmask


# ----------------------------------------------------------------------------------------------- memory
def _proc_status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class MemoryProbe:
    """Peak memory over a region: CUDA allocator peak, or CPU peak RSS (see the module docstring)."""

    def __init__(self, device: torch.device, isolated: bool = False):
        self.device, self.isolated = device, isolated

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda_max_memory_allocated"
            return
        self.base = (_proc_status_kb("VmRSS") or 0) * 1024
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.method = "vmhwm_reset" + ("_fresh_process" if self.isolated else "")
        except OSError:
            self.method = "ru_maxrss" + ("_fresh_process" if self.isolated else "_process_highwater")

    def stop(self) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method.startswith("vmhwm"):
            peak = (_proc_status_kb("VmHWM") or 0) * 1024
        else:
            import resource

            r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak = r if sys.platform == "darwin" else r * 1024
        mb = 1024 * 1024
        return dict(peak_mb=peak / mb, base_mb=self.base / mb, delta_mb=max(0, peak - self.base) / mb,
                    method=self.method)


# ----------------------------------------------------------------------------------------------- statistics
def stats(samples: Sequence[float]) -> dict:
    """median, quartiles (linear interpolation), IQR, min, max, n and the samples (ms)."""
    a = np.asarray(samples, dtype=float)
    q1, med, q3 = (float(x) for x in np.percentile(a, [25, 50, 75]))
    return dict(median=med, q1=q1, q3=q3, iqr=q3 - q1, min=float(a.min()), max=float(a.max()), n=int(a.size),
                samples=[float(x) for x in a])


# ----------------------------------------------------------------------------------------------- one measurement
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
    if knobs_fn is None or name not in SCHEDULES:
        return None
    try:
        knobs = knobs_fn()
    except ConfigError:
        return None
    return schedule_for(name, num_layers, visual, text, **knobs)


class Measurement:
    """One cell (method, visual count, batch size): its inputs and Runner, warm-up runs, timed runs, and the result row.

    Cells of one (visual, batch) group are interleaved by :func:`run_bench` (repeat r of every method, then repeat
    r + 1), so a load change on a shared machine hits every method alike instead of whichever ran at that moment.
    """

    def __init__(self, model: BenchModel, method: MethodSpec, visual: int, batch: int, settings: BenchSettings):
        from ..runner import Runner

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


# ----------------------------------------------------------------------------------------------- isolation
def _worker_main() -> int:
    """Child process of an isolated run: read a task (JSON) on stdin, print PROGRESS per repeat and RESULT <json>."""
    task = json.loads(sys.stdin.read())
    settings = BenchSettings(**task["settings"])
    if settings.threads:
        torch.set_num_threads(settings.threads)
    model = load_bench_model(**task["model"])
    method = MethodSpec(task["method"]["label"], task["method"]["name"], task["method"]["keep"],
                        tuple(task["method"]["policies"]))

    def tick():
        print("PROGRESS", flush=True)

    row = run_one(model, method, task["visual"], task["batch"], settings, tick)
    print("RESULT " + json.dumps(row), flush=True)
    return 0


def _run_isolated(model_kw: dict, method: MethodSpec, visual: int, batch: int, settings: BenchSettings,
                  tick: Callable[[], None]) -> dict:
    task = dict(settings=asdict(settings), model=model_kw, method=method.to_dict(), visual=visual, batch=batch)
    task["method"].pop("kind")
    proc = subprocess.Popen([sys.executable, "-m", "compactvl.measure.bench"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    proc.stdin.write(json.dumps(task))
    proc.stdin.close()
    row = None
    for line in proc.stdout:
        if line.startswith("PROGRESS"):
            tick()
        elif line.startswith("RESULT "):
            row = json.loads(line[len("RESULT "):])
    if proc.wait() == -9:
        raise MemoryError("the isolated process was killed (SIGKILL: most likely the out-of-memory killer)")
    if proc.returncode != 0 or row is None:
        raise RuntimeError(f"the isolated benchmark process for {method.label} (visual {visual}, batch {batch}) "
                           f"exited with code {proc.returncode}; its error is printed above")
    return row


# ----------------------------------------------------------------------------------------------- the sweep
_SKIPPED = object()

def environment(device: torch.device) -> dict:
    import transformers

    try:
        from importlib.metadata import version

        cv = version("compactvl")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        cv = None
    cpu = platform.processor() or None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env = dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
               compactvl=cv, platform=platform.platform(), cpu=cpu, cpu_count=os.cpu_count(),
               torch_threads=torch.get_num_threads(), device=device.type,
               gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               cuda=torch.version.cuda if device.type == "cuda" else None,
               loadavg_start=list(os.getloadavg()) if hasattr(os, "getloadavg") else None, loadavg_end=None)
    return env


def add_speedups(rows: list[dict]) -> None:
    """Fill speedup / efficiency from the vanilla row with the same visual count and batch."""
    base = {(r["visual_input"], r["batch"]): r for r in rows if r["kind"] == "vanilla"}
    for r in rows:
        v = base.get((r["visual_input"], r["batch"]))
        if v is None:
            continue
        r["speedup"] = v["prefill_ms"]["median"] / r["prefill_ms"]["median"]
        r["efficiency"] = r["speedup"] / r["macs"]["ideal_speedup"]


def _is_oom(e: BaseException) -> bool:
    msg = str(e).lower()
    return isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in msg \
        or "can't allocate memory" in msg


def run_bench(model: BenchModel, methods: Sequence[MethodSpec], settings: BenchSettings, *,
              model_kw: dict | None = None, progress: bool = True, command: str | None = None) -> dict:
    """Measure every method × visual count × batch; returns the report (``bench_schema.json``).

    A vanilla row is added for every (visual, batch) when ``methods`` lacks one (speedups need it). Within one
    (visual, batch) group the methods are interleaved: every method's warm-up, then timed repeat 1 of every method,
    then repeat 2, ... (see :class:`Measurement`). With ``settings.isolate`` each cell runs alone in a fresh process
    instead, and ``model_kw`` (the arguments of :func:`load_bench_model`) rebuilds the model there. A cell that runs
    out of memory is recorded under ``skipped`` and the sweep goes on.
    """
    from tqdm.auto import tqdm

    settings.check()
    if settings.isolate and model_kw is None:
        raise ConfigError("isolate=True needs model_kw (the load_bench_model arguments) to rebuild the model")
    methods = list(methods)
    if not methods:
        raise ConfigError("no method to benchmark; give at least one --method (e.g. vanilla, keep:0.25)")
    labels = [m.label for m in methods]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ConfigError(f"method(s) {dup} are given twice; give each once (labels must be unique)")
    if not any(m.kind == "vanilla" for m in methods):
        methods.insert(0, MethodSpec("vanilla", "vanilla"))
    threads_before = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)  # restored when the sweep ends
    env = environment(model.device)
    rows, skipped = [], []
    runs = len(settings.visual) * len(settings.batch) * len(methods) * (settings.warmup + settings.repeats)
    bar = tqdm(total=runs, disable=not progress, unit="run", desc="bench", file=sys.stderr)

    def tick() -> None:
        bar.update(1)

    def guarded(m: MethodSpec, v: int, b: int, fn: Callable[[], Any]) -> Any:
        """Run ``fn``; an out-of-memory error skips the cell (recorded) instead of ending the sweep."""
        try:
            return fn()
        except (torch.cuda.OutOfMemoryError, MemoryError, RuntimeError) as e:
            if isinstance(e, RuntimeError) and not _is_oom(e):
                raise
            skipped.append(dict(method=m.label, visual_input=v, batch=b, reason=f"out of memory: {e}"[:300]))
            if model.device.type == "cuda":
                torch.cuda.empty_cache()
            return _SKIPPED

    try:
        for v in settings.visual:
            for b in settings.batch:
                if settings.isolate:  # one fresh process per cell, cells one after the other
                    for m in methods:
                        bar.set_postfix_str(f"{m.label} V={v} B={b}")
                        row = guarded(m, v, b, lambda: _run_isolated(model_kw, m, v, b, settings, tick))
                        if row is not _SKIPPED:
                            rows.append(row)
                    continue
                # interleaved: warm-ups of every method, then repeat r of every method, then repeat r + 1, ...
                bar.set_postfix_str(f"V={v} B={b}")
                gc.collect()
                cells = [c for m in methods
                         if (c := guarded(m, v, b, lambda: Measurement(model, m, v, b, settings))) is not _SKIPPED]
                for phase in ["warmup"] * settings.warmup + ["timed"] * settings.repeats:
                    for c in list(cells):
                        if guarded(c.method, v, b, getattr(c, phase)) is _SKIPPED:
                            cells.remove(c)
                        tick()
                rows += [c.result() for c in cells]
                del cells
    finally:
        bar.close()
        torch.set_num_threads(threads_before)
    add_speedups(rows)
    env["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    s = asdict(settings)
    s["threads"] = env["torch_threads"]
    return {
        "schema": SCHEMA_ID,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "environment": env,
        "model": model.describe(),
        "settings": s,
        "methods": [m.to_dict() for m in methods],
        "definitions": DEFINITIONS,
        "results": rows,
        "skipped": skipped,
        "accuracy": None,
        "plots": {},
    }


# ----------------------------------------------------------------------------------------------- schema
def load_schema() -> dict:
    from importlib.resources import files

    return json.loads(files("compactvl.measure").joinpath("bench_schema.json").read_text())


def validate_report(report: dict) -> None:
    """Validate against ``bench_schema.json`` (needs ``jsonschema``); raise ConfigError listing the first errors."""
    try:
        import jsonschema
    except ImportError:
        raise ConfigError("validating a bench report needs the jsonschema package; pip install jsonschema") from None
    validator = jsonschema.Draft202012Validator(load_schema())
    errors = sorted(validator.iter_errors(report), key=lambda e: list(e.absolute_path))
    if errors:
        msg = "; ".join(f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors[:5])
        raise ConfigError(f"the bench report does not match bench_schema.json: {msg}")


# ----------------------------------------------------------------------------------------------- accuracy
def load_accuracy(path: str | Path) -> dict[str, dict]:
    """Accuracies per method label from a JSON file: ``{label: acc}``, ``{label: {"accuracy": a, "llm_macs": m}}``,
    ``{label: "run/eval/metrics.json"}`` (the file ``compactvl eval`` writes; path relative to this file), a list of
    ``{"method": label, "accuracy": a[, "llm_macs": m]}``, or any of these under ``"results"``.
    Returns ``{label: {"accuracy": a, "llm_macs": m | None}}``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read accuracies from {path}: {e}; give a JSON file such as "
                         f'{{"vanilla": 0.62, "keep:0.25": 0.58}}') from None
    if isinstance(data, dict) and "results" in data and isinstance(data["results"], (list, dict)):
        data = data["results"]
    items = data.items() if isinstance(data, dict) else (
        ((r.get("method") or r.get("label"), r) if isinstance(r, dict) else (None, r)) for r in data)
    out = {}
    for label, val in items:
        if isinstance(val, str):  # the metrics.json of `compactvl eval` (path relative to this file)
            metrics = path.parent / val
            try:
                val = json.loads(metrics.read_text())
            except (OSError, ValueError) as e:
                raise InputError(f"{path}: entry {label!r} points to {metrics}, which cannot be read as JSON ({e}); "
                                 f"give the metrics.json that `compactvl eval` wrote, or a number") from None
        rec = val if isinstance(val, dict) else {"accuracy": val}
        acc = rec.get("accuracy")
        if label is None or isinstance(acc, bool) or not isinstance(acc, (int, float)) or not math.isfinite(acc):
            raise InputError(f"{path}: entry {label!r} has no numeric accuracy; each method needs a number, e.g. "
                             f'{{"vanilla": 0.62}} or [{{"method": "vanilla", "accuracy": 0.62}}]')
        m = rec.get("llm_macs", rec.get("macs"))
        out[str(label)] = dict(accuracy=float(acc), llm_macs=None if m is None else float(m))
    if not out:
        raise InputError(f"{path} holds no accuracies")
    return out


def pareto_front(points: Iterable[tuple[float, float]]) -> list[int]:
    """Indices of the points (macs, accuracy) no other point beats: none has <= MACs and >= accuracy with one of them
    strictly better. Sorted by MACs."""
    pts = list(points)
    order = sorted(range(len(pts)), key=lambda i: (pts[i][0], -pts[i][1]))
    front, best = [], -math.inf
    for i in order:
        if pts[i][1] > best:
            front.append(i)
            best = pts[i][1]
    return front


def accuracy_points(report: dict, accuracy: dict[str, dict]) -> list[dict]:
    """(label, LLM MACs, accuracy) per method: MACs from the bench rows (first visual count) or the file."""
    v0 = report["settings"]["visual"][0]
    macs = {r["method"]: r["macs"]["llm_macs"] for r in report["results"] if r["visual_input"] == v0}
    pts = []
    for label, rec in accuracy.items():
        m = rec["llm_macs"] if rec["llm_macs"] is not None else macs.get(label)
        if m is None:
            raise InputError(f"accuracy given for '{label}' but no bench row has that method and the file gives no "
                             f"llm_macs; use a label from --method ({', '.join(sorted(macs))}) or add llm_macs")
        pts.append(dict(method=label, llm_macs=m, accuracy=rec["accuracy"]))
    for i in pareto_front([(p["llm_macs"], p["accuracy"]) for p in pts]):
        pts[i]["pareto"] = True
    for p in pts:
        p.setdefault("pareto", False)
    return pts


# ----------------------------------------------------------------------------------------------- Markdown
def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


def markdown(report: dict) -> str:
    """A Markdown page: machine, model, command, then one table row per measurement."""
    env, mod, st = report["environment"], report["model"], report["settings"]
    dev = env["gpu"] if env["device"] == "cuda" else f"{env['cpu']} ({env['cpu_count']} logical CPUs)"
    lines = [
        f"# compactvl bench: {mod['name']}",
        "",
        f"- machine: {dev}; torch {env['torch']}, transformers {env['transformers']}, {env['torch_threads']} torch "
        f"threads; load average at start {_fmt(env['loadavg_start'][0] if env['loadavg_start'] else None)}, at end "
        f"{_fmt(env['loadavg_end'][0] if env['loadavg_end'] else None)}",
        f"- model: {mod['model_type']}, {mod['num_layers']} layers, hidden {mod['hidden_size']}, "
        f"{mod['parameters'] / 1e6:.1f}M parameters ({mod['weights']} weights), {mod['dtype']} on {mod['device']}, "
        f"attention {mod['attn_implementation']}",
        f"- inputs: {st['text']} text tokens ({st['prefix']} before the image), visual tokens {st['visual']}, batch "
        f"{st['batch']}; {st['warmup']} warm-up + {st['repeats']} timed repeats, {st['decode_tokens']} decode steps "
        f"each",
    ]
    if report.get("command"):
        lines.append(f"- command: `{report['command']}`")
    lines += [
        "",
        "| method | visual in → LLM (last layer) | batch | prefill ms, median [IQR] | speedup | MACs ratio | "
        "ideal speedup | efficiency | scoring % | decode ms/token | samples/s | decode tok/s | peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        p, d, sch = r["prefill_ms"], r["decode_ms_per_token"], r["schedule"]
        flag = "" if sch["matches"] is not False else " ⚠ schedule mismatch"
        lines.append(
            f"| {r['method']}{flag} | {r['visual_input']} → {sch['visual'][0]} ({sch['visual'][-1]}) | {r['batch']} | "
            f"{p['median']:.1f} [{p['iqr']:.1f}] | {_fmt(r['speedup'])}× | {r['macs']['ratio']:.3f} | "
            f"{r['macs']['ideal_speedup']:.2f}× | {_fmt(r['efficiency'])} | "
            f"{_fmt(None if r['score_share'] is None else 100 * r['score_share'], '.1f')} | "
            f"{_fmt(d['median'] if d else None, '.1f')} | {r['throughput']['prefill_samples_per_s']:.2f} | "
            f"{_fmt(r['throughput']['decode_tokens_per_s'], '.1f')} | {r['memory']['peak_mb']:.0f} |")
    for s in report["skipped"]:
        lines.append(f"| {s['method']} | {s['visual_input']} | {s['batch']} | skipped: {s['reason']} |" + " – |" * 9)
    if report.get("accuracy"):
        lines += ["", "| method | LLM GMACs | accuracy | Pareto |", "|---|---|---|---|"]
        lines += [f"| {a['method']} | {a['llm_macs'] / 1e9:.2f} | {a['accuracy']:.4g} | {'yes' if a['pareto'] else ''} |"
                  for a in report["accuracy"]]
    mem = {r["memory"]["method"] for r in report["results"]}
    lines += ["", f"Memory: {', '.join(sorted(mem))} (definitions: docs/benchmarks.md, \"compactvl bench\").", ""]
    return "\n".join(lines)


def write_outputs(report: dict, out: str | Path, accuracy: str | Path | None = None) -> dict[str, Path]:
    """Write bench.json, bench.md and the PNG plots into ``out``; returns {kind: path}."""
    from . import plots

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    if accuracy is not None:
        report["accuracy"] = accuracy_points(report, load_accuracy(accuracy))
    report["plots"] = {}
    if plots.available():
        written["prefill_vs_visual"] = plots.prefill_vs_visual(report, out / "prefill_vs_visual.png")
        if report["accuracy"]:
            written["accuracy_vs_macs"] = plots.accuracy_vs_macs(report, out / "accuracy_vs_macs.png")
        report["plots"] = {k: p.name for k, p in written.items()}
    else:
        report["plots"] = {"note": "matplotlib is not installed; pip install 'compactvl[plot]' for PNG plots"}
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    (out / "bench.md").write_text(markdown(report))
    written["json"], written["markdown"] = out / "bench.json", out / "bench.md"
    return written


if __name__ == "__main__":
    sys.exit(_worker_main())

"""The ``compactvl bench`` sweep: every method × visual count × batch size, interleaved per repeat (or isolated), out-
of-memory cells skipped, speedups from the matching vanilla row; returns the report (``bench_schema.json``)."""
from __future__ import annotations

import gc
import os
import platform
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Callable, Sequence

import torch
import transformers
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..hardware import cpu_name, loadavg
from .isolation import run_isolated
from .measurement import BenchSettings, Measurement
from .methods import MethodSpec
from .model import BenchModel
from .schema import DEFINITIONS, SCHEMA_ID

_SKIPPED = object()


def environment(device: torch.device) -> dict:
    """Versions, the machine and the load average at the start (``loadavg_end`` is filled when the sweep ends)."""
    try:
        cv = version("compactvl")
    except PackageNotFoundError:  # not installed as a distribution
        cv = None
    return dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                compactvl=cv, platform=platform.platform(), cpu=cpu_name(), cpu_count=os.cpu_count(),
                torch_threads=torch.get_num_threads(), device=device.type,
                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                cuda=torch.version.cuda if device.type == "cuda" else None,
                loadavg_start=loadavg(), loadavg_end=None)


def add_speedups(rows: list[dict]) -> None:
    """Fill speedup / efficiency from the vanilla row with the same visual count and batch: speedup = vanilla prefill
    median / this prefill median (a ratio of medians)."""
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
    then repeat 2, ... (see :class:`~compactvl.bench.measurement.Measurement`). With ``settings.isolate`` each cell
    runs alone in a fresh process instead, and ``model_kw`` (the arguments of
    :func:`~compactvl.bench.model.load_bench_model`) rebuilds the model there. A cell that runs out of memory is
    recorded under ``skipped`` and the sweep goes on.
    """
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
                        row = guarded(m, v, b, lambda: run_isolated(model_kw, m, v, b, settings, tick))
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
    env["loadavg_end"] = loadavg()
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

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
from .op_timing import OpMeasurement, OpSpec, add_op_shares, check_ops
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
              model_kw: dict | None = None, progress: bool = True, command: str | None = None,
              ops: Sequence[OpSpec] = ()) -> dict:
    """Measure every method × visual count × batch; returns the report (``bench_schema.json``).

    A vanilla row is added for every (visual, batch) when ``methods`` lacks one (speedups need it). Within one
    (visual, batch) group the methods are interleaved: every method's warm-up, then timed repeat 1 of every method,
    then repeat 2, ... (see :class:`~compactvl.bench.measurement.Measurement`). With ``settings.isolate`` each cell
    runs alone in a fresh process instead, and ``model_kw`` (the arguments of
    :func:`~compactvl.bench.model.load_bench_model`) rebuilds the model there. A cell that runs out of memory is
    recorded under ``skipped`` and the sweep goes on.

    ``ops``: pre-LLM token ops whose forward is timed on synthetic inputs (:mod:`~compactvl.bench.op_timing`) for
    every (visual, batch), interleaved with the LM cells of that group (in-process even with ``isolate``); their rows
    (``ops`` in the report) give the op time as a share of the vanilla prefill.
    """
    settings.check()
    ops = list(ops)
    check_ops(ops, settings)
    if settings.isolate and model_kw is None:
        raise ConfigError("isolate=True needs model_kw (the load_bench_model arguments) to rebuild the model")
    methods = list(methods)
    if not methods and not ops:  # with ops alone, the vanilla row below is their reference
        raise ConfigError("no method to benchmark; give at least one --method (e.g. vanilla, keep:0.25) or --op")
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
    rows, skipped, op_rows = [], [], []
    runs = len(settings.visual) * len(settings.batch) * (len(methods) + len(ops)) * (settings.warmup + settings.repeats)
    bar = tqdm(total=runs, disable=not progress, unit="run", desc="bench", file=sys.stderr)

    def tick() -> None:
        bar.update(1)

    def guarded(m: MethodSpec | OpSpec, v: int, b: int, fn: Callable[[], Any]) -> Any:
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
                bar.set_postfix_str(f"V={v} B={b}")
                gc.collect()
                op_cells = [(o, c) for o in ops if (c := guarded(o, v, b, lambda: OpMeasurement(
                    o, v, b, settings, model.device, model.dtype))) is not _SKIPPED]
                if settings.isolate:  # one fresh process per cell, cells one after the other
                    for m in methods:
                        bar.set_postfix_str(f"{m.label} V={v} B={b}")
                        row = guarded(m, v, b, lambda: run_isolated(model_kw, m, v, b, settings, tick))
                        if row is not _SKIPPED:
                            rows.append(row)
                    cells = []
                else:
                    cells = [(m, c) for m in methods
                             if (c := guarded(m, v, b, lambda: Measurement(model, m, v, b, settings))) is not _SKIPPED]
                # interleaved: warm-ups of every cell, then repeat r of every cell, then repeat r + 1, ... (ops
                # first: an op that cannot run on these inputs fails before the LM's first run)
                for phase in ["warmup"] * settings.warmup + ["timed"] * settings.repeats:
                    for group in (op_cells, cells):
                        for spec, c in list(group):
                            if guarded(spec, v, b, getattr(c, phase)) is _SKIPPED:
                                group.remove((spec, c))
                            tick()
                rows += [c.result() for _, c in cells]
                op_rows += [c.result() for _, c in op_cells]
                del cells, op_cells
    finally:
        bar.close()
        torch.set_num_threads(threads_before)
    add_speedups(rows)
    add_op_shares(op_rows, rows)
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
        "ops": op_rows if ops else None,
        "skipped": skipped,
        "accuracy": None,
        "plots": {},
    }

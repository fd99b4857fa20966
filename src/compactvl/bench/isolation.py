"""Isolated cells (``compactvl bench --isolate``): each cell runs alone in a fresh Python process
(``python -m compactvl.bench.worker``), so its peak memory does not depend on what ran before.

Protocol: the parent writes one task as JSON on the child's stdin (settings, the ``load_bench_model`` arguments, the
method, visual count and batch); the child prints ``PROGRESS`` after every run and ``RESULT <json row>`` at the end.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from typing import Callable

from .measurement import BenchSettings
from .methods import MethodSpec

WORKER = "compactvl.bench.worker"


def run_isolated(model_kw: dict, method: MethodSpec, visual: int, batch: int, settings: BenchSettings,
                 tick: Callable[[], None]) -> dict:
    """Measure one cell in a fresh process; ``tick`` runs on every PROGRESS line. A child killed by SIGKILL (most
    likely the out-of-memory killer) raises MemoryError, any other failure RuntimeError."""
    task = dict(settings=asdict(settings), model=model_kw, method=method.to_dict(), visual=visual, batch=batch)
    task["method"].pop("kind")
    proc = subprocess.Popen([sys.executable, "-m", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
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

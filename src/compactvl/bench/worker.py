"""Child process of an isolated ``compactvl bench`` cell (see :mod:`compactvl.bench.isolation`): read a task (JSON)
on stdin, print ``PROGRESS`` after every run and ``RESULT <json row>`` at the end. Run as
``python -m compactvl.bench.worker``; nothing imports this module."""
from __future__ import annotations

import json
import sys

import torch

from .measurement import BenchSettings, run_one
from .methods import MethodSpec
from .model import load_bench_model


def main() -> int:
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


if __name__ == "__main__":
    sys.exit(main())

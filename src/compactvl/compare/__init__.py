"""``compactvl demo --compare``: trained systems side by side, at equal visual tokens and an equal training budget.

    compactvl demo --compare systems [--budget 16] [--only a,b] [--check] [--quick]   # a packaged suite
    compactvl demo --compare venvl,leomini,llava_stf [--unequal]                       # recipes as named

A **suite** (``recipes/compare/NAME.yaml`` or a path) names a baseline, the sections every system shares (``common``:
the same data, steps, batch, stage and evaluation; ``cuda``: a larger budget used instead when the device is CUDA),
and, per budget of visual tokens entering the LM, the systems: each a recipe plus changes to its ``model`` section.
Recipes named on the command line form a suite of one budget whose baseline is the first.

Before anything trains, every system's model is built (tiny random parts with ``--quick``, on the same patch grids)
and the visual tokens entering its LM are measured on one evaluation sample. A system whose count differs from its
budget (or, for named recipes, from the others'), or whose data, steps or stage differ, is refused, naming the
difference (``--unequal`` accepts named recipes as they are). ``--check`` stops there and prints the plan.

Each system is a full demo run in ``OUT/<budget>/<system>`` and is resumable: a finished run with the same resolved
config is reused, an interrupted one resumes from its last checkpoint (``train.save_every``). Every system is
compared with the baseline on the same items (paired bootstrap interval and McNemar's p, ``compactvl.stats``).
``compare.json``, ``compare.md``, ``compare.png`` (accuracy with intervals) and ``curves.png`` (training loss per
step) go into ``OUT``, rewritten after each system.

Every system is also paired with the question-only control (``compactvl.controls``): the answer each test question
has most often in the training data, no image looked at; a system that does not beat it outside the noise has not
shown that it uses the image on that set. ``suite`` resolves and checks the systems, ``report`` writes the outputs.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Sequence

from ..demo import SharedCaches, run_demo
from ..device import default_device
from ..errors import ConfigError
from .report import markdown_table, task_losses, write_summary
from .suite import (COMPARE, SUITE_DIR, TABLE, System, _finished, _resumable, check_comparable, is_suite,
                    list_suites, named_suite, read_suite, resolve_suite)

__all__ = ["COMPARE", "SUITE_DIR", "TABLE", "System", "check_comparable", "is_suite", "list_suites",
           "markdown_table", "named_suite", "read_suite", "resolve_suite", "run_comparison", "task_losses",
           "write_summary"]


def run_comparison(spec: str | Sequence[str], out_dir: str | os.PathLike | None = None, quick: bool = False,
                   overrides: Sequence[str] = (), budgets: Sequence[str] = (), only: Sequence[str] = (),
                   check: bool = False, unequal: bool = False, fresh: bool = False, report: bool = False,
                   progress: bool = True, log: Callable[[str], None] = print, command: str | None = None) -> dict:
    """Resolve and check every system, then train + evaluate those not finished yet, and write the comparison
    (``report``: only write the comparison of the systems finished so far; nothing is built or trained)."""
    named = not isinstance(spec, str) or not is_suite(spec)
    suite = named_suite(list(spec) if not isinstance(spec, str) else
                        [r.strip() for r in spec.split(",") if r.strip()]) if named else read_suite(spec)
    if unequal and not named:
        raise ConfigError("--unequal is for recipes named on the command line; a suite's systems share a budget")
    cuda = default_device().type == "cuda"
    systems = resolve_suite(suite, quick, overrides, [str(b) for b in budgets], list(only), cuda=cuda and not quick)
    out = Path(out_dir or f"runs/compare-{suite['name'].replace(' ', '-')}")
    for s in systems:
        s.cfg["output_dir"] = str(out / s.budget.replace(" ", "_") / s.name)
    if report:
        done = sum(_finished(Path(s.cfg["output_dir"]), s.cfg, quick) for s in systems)
        log(f"--report: {done} of {len(systems)} system(s) finished with this config; nothing trains")
        return write_summary(suite, systems, out, quick, overrides, command, 0.0, log)
    log(f"{len(systems)} system(s) of {suite['name']!r}" + (" (the suite's CUDA budget)" if cuda and not quick
                                                            and suite.get("cuda") else "") +
        "; measuring the visual tokens each feeds its LM, before anything trains:")
    check_comparable(systems, quick, unequal, log)
    if check:
        log("--check: every system builds and its budget matches; nothing was trained")
        return {"systems": [{"key": s.key, "tokens": s.tokens, "llm_gmacs": s.llm_gmacs} for s in systems]}
    t0 = time.perf_counter()
    summary: dict = {}
    shared = SharedCaches()  # systems on the same encoder and images encode them once (frozen encoders)
    for i, s in enumerate(_by_encoders(systems), 1):
        run_dir = Path(s.cfg["output_dir"])
        if not fresh and _finished(run_dir, s.cfg, quick):
            log(f"\n=== [{i}/{len(systems)}] {s.key}: finished earlier with the same config, reused ({run_dir})")
            continue
        resume = not fresh and _resumable(run_dir, s.cfg, log)
        log(f"\n=== [{i}/{len(systems)}] {s.key} (recipe {s.recipe})" + (", resuming its training" if resume else ""))
        run_demo(s.cfg, run_dir, quick=quick, progress=progress, log=log, tiny_size=None, resume=resume,
                 command=command, shared=shared)
        summary = write_summary(suite, systems, out, quick, overrides, command, time.perf_counter() - t0, log)
    return summary or write_summary(suite, systems, out, quick, overrides, command, time.perf_counter() - t0, log)

def _by_encoders(systems: Sequence[System]) -> list[System]:
    """The order to run ``systems`` in: grouped by their encoders (in order of first appearance, so the baseline
    stays first), so that each group's training images are encoded once (``SharedCaches`` keeps one group's)."""
    groups: dict[str, list[System]] = {}
    for s in systems:
        groups.setdefault(json.dumps(s.cfg["model"]["encoders"], sort_keys=True, default=str), []).append(s)
    return [s for group in groups.values() for s in group]

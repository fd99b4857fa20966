"""Accuracy beside MACs (``compactvl bench --accuracy``): read accuracies per method label, pair them with the bench
rows' LLM MACs, and mark the Pareto front (no other method has fewer MACs and higher accuracy)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

from ..errors import InputError


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

"""PNG charts of the applications (matplotlib, the ``plot`` extra; Agg backend, no display needed). No compactvl
imports: the charts read ``compactvl bench`` reports (dicts) and ``compactvl demo`` rows (duck-typed).

* ``prefill_vs_visual`` (bench): prefill median (ms, IQR as error bars) against the visual tokens given to the model
  (one line per method: how each scales with the input) and against the visual tokens per decoder layer averaged over
  the layers (where time would fall on one line if it followed the token schedule); one row of panels per batch size.
* ``accuracy_vs_macs`` (bench): accuracy against LLM GMACs per method, the Pareto front (no other method has fewer MACs
  and higher accuracy) drawn as a step line and its points filled.
* ``accuracy_bars`` (demo): accuracy per category and overall for each method, one panel per dataset, chance marked.
* ``loss_curves`` (demo --compare): the training loss per step of each system, raw and as a moving average.
"""
from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path
from typing import Sequence


def available() -> bool:
    """Whether matplotlib (the ``plot`` extra) is installed."""
    return importlib.util.find_spec("matplotlib") is not None


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib  # optional (the plot extra) and slow to import: only when a chart is drawn

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt  # after choosing the backend

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write as PNG (110 dpi) and close ``fig``; returns the path."""
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def _title(report: dict) -> str:
    m, env = report["model"], report["environment"]
    dev = env["gpu"] if env["device"] == "cuda" else f"{env['cpu_count']} CPUs, torch threads: {env['torch_threads']}"
    return f"{m['name']} ({m['dtype']}, {dev}), text {report['settings']['text']} tokens"


def prefill_vs_visual(report: dict, path: str | Path) -> Path:
    plt = pyplot()
    batches = sorted({r["batch"] for r in report["results"]})
    fig, axes = plt.subplots(len(batches), 2, figsize=(11, 4.2 * len(batches)), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in report["results"]))
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    for (left, right), b in zip(axes, batches):
        for m in methods:
            rows = sorted((r for r in report["results"] if r["batch"] == b and r["method"] == m),
                          key=lambda r: r["visual_input"])
            if not rows:
                continue
            y = [r["prefill_ms"]["median"] for r in rows]
            err = [[r["prefill_ms"]["median"] - r["prefill_ms"]["q1"] for r in rows],
                   [r["prefill_ms"]["q3"] - r["prefill_ms"]["median"] for r in rows]]
            left.errorbar([r["visual_input"] for r in rows], y, yerr=err, marker="o", capsize=3, label=m,
                          color=colors[m])
            mean_visual = [sum(r["schedule"]["visual"]) / len(r["schedule"]["visual"]) for r in rows]
            right.errorbar(mean_visual, y, yerr=err, marker="o", capsize=3, linestyle="none", color=colors[m])
        left.set_xlabel("visual tokens given (before any reduction)")
        right.set_xlabel("visual tokens per decoder layer, mean over layers (the MACs schedule)")
        for ax in (left, right):
            ax.set_ylabel("prefill (time to first token), ms")
            ax.set_title(f"batch {b}", fontsize=10)
            ax.grid(alpha=0.3)
            ax.set_xlim(left=0)
            ax.set_ylim(bottom=0)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(_title(report), fontsize=9)
    return save_figure(fig, path)


def accuracy_vs_macs(report: dict, path: str | Path) -> Path:
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator  # optional, as in pyplot()

    pts = report["accuracy"]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    front = sorted((p for p in pts if p["pareto"]), key=lambda p: p["llm_macs"])
    ax.step([p["llm_macs"] / 1e9 for p in front], [p["accuracy"] for p in front], where="post", color="C3",
            alpha=0.6, label="Pareto front")
    for p in pts:
        ax.scatter(p["llm_macs"] / 1e9, p["accuracy"], color="C3" if p["pareto"] else "C0",
                   facecolors=None if p["pareto"] else "none", zorder=3)
        ax.annotate(p["method"], (p["llm_macs"] / 1e9, p["accuracy"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=6))
    ax.margins(x=0.15, y=0.1)  # room for the labels
    ax.set_xlabel("LLM GMACs per sample (prefill, analytic)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(_title(report), fontsize=9)
    return save_figure(fig, path)


def accuracy_bars(rows: Sequence, path: str | Path, title: str = "") -> Path:
    """Grouped bars: accuracy per category and overall for each method, one panel per dataset, each with its 95 %
    interval as an error bar (``ci95``); chance as a black tick over each group. ``rows``: objects with ``method``
    and ``results`` (one EvalResult per dataset, as ``compactvl.demo.VariantResult``)."""
    plt = pyplot()
    sets = [r.dataset for r in rows[0].results]
    fig, axes = plt.subplots(1, len(sets), figsize=(max(7.0, 5.5 * len(sets)) + 2.5 * (len(rows) > 6), 4.6),
                             squeeze=False)
    width = 0.8 / len(rows)
    for k, (ax, name) in enumerate(zip(axes[0], sets)):
        base = rows[0].results[k]
        cats = list(base.per_category) + ["overall"]
        chance = [base.per_category[c].get("chance") for c in base.per_category] + [base.chance]
        for j, v in enumerate(rows):
            r = v.results[k]
            acc = [r.per_category[c]["accuracy"] for c in r.per_category] + [r.accuracy]
            ci = [r.per_category[c].get("ci95") or (a, a) for c, a in zip(r.per_category, acc)] + [r.ci95]
            err = [[a - lo for a, (lo, _) in zip(acc, ci)], [hi - a for a, (_, hi) in zip(acc, ci)]]
            ax.bar([i + (j - (len(rows) - 1) / 2) * width for i in range(len(cats))], acc, width, label=v.method,
                   yerr=err, capsize=2, error_kw={"elinewidth": 0.8}, color=_colour(j, len(rows)))
        for i, c in enumerate(chance):
            if c is not None:
                ax.plot([i - 0.42, i + 0.42], [c, c], color="black", lw=2,
                        label="chance" if i == 0 else None)
        ax.set_xticks(range(len(cats)), cats, rotation=20)
        ax.set_ylim(0, 1)
        ax.set_ylabel("exact-match accuracy (95% interval)")
        ax.set_title(f"{name} (n={base.n})")
        ax.grid(axis="y", alpha=0.3)
    if len(rows) > 6:  # many methods: the legend beside the panels, not over their bars
        axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        axes[0][0].legend(fontsize=8, loc="upper right")
    if title:
        fig.suptitle("\n".join(textwrap.wrap(title, 110 if len(sets) > 1 else 80)), fontsize=9)
    return save_figure(fig, path)


def _colour(j: int, n: int):
    """The j-th of n methods' colour: matplotlib's default cycle up to 10, then tab20 (no two methods alike)."""
    plt = pyplot()
    return plt.get_cmap("tab20")(j % 20) if n > 10 else f"C{j % 10}"


def loss_curves(series: dict[str, Sequence[float]], path: str | Path, title: str = "", window: int = 10) -> Path:
    """Training loss against the optimizer step, one line per system: faint per-step values and a trailing moving
    average over ``window`` steps on top."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8.0, 4.6))
    for name, losses in series.items():
        xs = list(range(1, len(losses) + 1))
        line, = ax.plot(xs, losses, alpha=0.25, lw=0.8)
        avg = [sum(losses[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(losses))]
        ax.plot(xs, avg, color=line.get_color(), lw=1.6, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"training loss (line: mean of the last {window} steps)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def study_charts(report: dict, out_dir: str | Path) -> list[Path]:
    """``compactvl study``: retention against the LM's measured speedup (95 % intervals of retention as error bars;
    one colour per method, one point per budget and seed) per evaluation set, and a heat map of per-category
    retention (rows: method at each budget, columns: categories) showing what degrades first."""
    plt = pyplot()
    out = Path(out_dir)
    ok = [c for c in report["cells"] if c["status"] == "ok" and c.get("retention") is not None]
    sets = sorted({c["dataset"] for c in ok})
    if not sets:  # retention is undefined where the uncompressed model scores 0
        return []
    fig, axes = plt.subplots(1, len(sets), figsize=(max(6.5, 5.5 * len(sets)), 4.6), squeeze=False)
    methods = sorted({c["method"] for c in ok})
    colours = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    for ax, name in zip(axes[0], sets):
        for m in methods:
            cs = [c for c in ok if c["dataset"] == name and c["method"] == m]
            x = [c["speedup"] or 1.0 for c in cs]
            y = [c["retention"] for c in cs]
            err = [[r - c["retention_ci95"][0] for r, c in zip(y, cs)], [c["retention_ci95"][1] - r for r, c in zip(y, cs)]]
            ax.errorbar(x, y, yerr=err, fmt="o", color=colours[m], label=m, capsize=2, ms=4)
            for xi, yi, c in zip(x, y, cs):
                ax.annotate(f"{c['keep']:g}", (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xlabel("LM speedup vs uncompressed (measured)")
        ax.set_ylabel("accuracy retention (95% interval)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    paths = [save_figure(fig, out / "retention_vs_speedup.png")]
    first = [c for c in ok if c["dataset"] == sets[0]]
    cats = sorted({k for c in first for k in c["per_category"]})
    grid = [[(c["per_category"].get(k) or {}).get("retention") for k in cats] for c in first]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(cats) + 3), max(3.0, 0.32 * len(first) + 1.5)))
    ax.imshow([[float("nan") if v is None else v for v in row] for row in grid], cmap="RdYlGn", vmin=0, vmax=1.2,
              aspect="auto")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, "–" if v is None else f"{v:.2f}", ha="center", va="center", fontsize=6)
    ax.set_xticks(range(len(cats)), cats, rotation=20)
    ax.set_yticks(range(len(first)), [f"{c['method']} {c['keep']:g}" + (f" s{c['seed']}" if c["seed"] is not None
                                                                       else "") for c in first], fontsize=7)
    ax.set_title(f"{sets[0]}: retention per category")
    paths.append(save_figure(fig, out / "category_retention.png"))
    return paths

"""Results on disk and on screen: JSON, CSV, plots (matplotlib, Agg) and a one-screen summary table.

A results directory holds ``results.json`` (settings, per-sample records, aggregates),
``records.csv``, ``summary.csv`` and the plots: ``heatmap_<task>.png`` (x: context length,
y: depth %, red → yellow → green) for depth-gridded tasks, ``accuracy_vs_length.png``, and for
perplexity ``perplexity.csv`` + ``perplexity_vs_position.png``. It is written to a temporary
directory next to the destination and renamed into place, so a failed run leaves nothing.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from collections.abc import Sequence

from convert.atomic import atomic_path, staged_directory

HEATMAP_SIZE = (8.0, 5.0)  # inches; at HEATMAP_DPI → 800 × 500 pixels
HEATMAP_DPI = 100


def format_length(n: int) -> str:
    """``1024 → "1K"``, ``1536 → "1.5K"``, ``1048576 → "1M"``, ``500 → "500"``."""
    for div, suffix in ((1 << 20, "M"), (1 << 10, "K")):
        if n >= div:
            return f"{n / div:g}{suffix}"
    return str(n)


def _write_csv(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    if not rows:
        open(path, "w").close()
        return
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: "|".join(map(str, v)) if isinstance(v, list) else v for k, v in r.items()})


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_heatmap(path: str, cells: Sequence[dict], task: str) -> None:
    """Mean score per (depth %, length): x context length, y depth %, red (0) → yellow → green (1)."""
    from matplotlib.colors import LinearSegmentedColormap

    plt = _pyplot()
    lengths = sorted({c["length"] for c in cells})
    depths = sorted({c["depth_percent"] for c in cells})
    grid = [[math.nan] * len(lengths) for _ in depths]
    for c in cells:
        grid[depths.index(c["depth_percent"])][lengths.index(c["length"])] = c["score"]
    cmap = LinearSegmentedColormap.from_list("ryg", ["#d7191c", "#fdae61", "#ffffbf", "#a6d96a", "#1a9641"])
    fig, ax = plt.subplots(figsize=HEATMAP_SIZE, dpi=HEATMAP_DPI)
    im = ax.imshow(grid, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", origin="upper")
    ax.set_xticks(range(len(lengths)), [format_length(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("depth (%)")
    ax.set_title(f"{task}: score by context length and needle depth")
    if len(lengths) * len(depths) <= 200:
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="score")
    fig.savefig(path, dpi=HEATMAP_DPI)  # no bbox_inches="tight": the image keeps HEATMAP_SIZE × DPI
    plt.close(fig)


def plot_accuracy_vs_length(path: str, by_length: Sequence[dict]) -> None:
    plt = _pyplot()
    series = defaultdict(list)
    for r in by_length:
        series[r["task"]].append((r["length"], r["score"]))
    fig, ax = plt.subplots(figsize=HEATMAP_SIZE, dpi=HEATMAP_DPI)
    for task, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=task)
    ax.set_xscale("log", base=2)
    lengths = sorted({r["length"] for r in by_length})
    ax.set_xticks(lengths, [format_length(n) for n in lengths])
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("mean score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(path, dpi=HEATMAP_DPI)
    plt.close(fig)


def plot_extension(
    path: str,
    series: dict[str, dict],
    title: str = "passkey accuracy vs context length",
    curves: dict[str, list[dict]] | None = None,
) -> str:
    """Accuracy vs context length, one line per model, each model's training length marked.

    Args:
        path: the PNG to write (atomically).
        series: ``{label: {"accuracy": {length: score}, "trained_length": int | None}}``, in legend order.
        curves: optional learning curves ``{label: [{"step": int, "accuracy": {length: score}}, …]}``
            (labels as in ``series``), drawn in a second panel: accuracy against training step, a
            solid line for the shorter length and a dashed one for the longer, in each model's colour.
    """
    plt = _pyplot()
    height = HEATMAP_SIZE[1] + 0.3 * (len(series) + 1) // 2
    if curves:
        fig, (ax, cax) = plt.subplots(1, 2, figsize=(2 * HEATMAP_SIZE[0], height), dpi=HEATMAP_DPI)
    else:
        fig, ax = plt.subplots(figsize=(HEATMAP_SIZE[0], height), dpi=HEATMAP_DPI)
    lengths = sorted({int(n) for s in series.values() for n in s["accuracy"]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, s) in enumerate(series.items()):
        pts = sorted((int(n), v) for n, v in s["accuracy"].items())
        color = colors[i % len(colors)]
        trained = s.get("trained_length")
        name = f"{label} (trained at {format_length(trained)})" if trained else label
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color, label=name)
        if trained:
            ax.axvline(trained, color=color, ls=":", lw=1.2)
            acc = dict(pts).get(int(trained))
            if acc is not None:  # a star where the model is scored at its own training length
                ax.plot([trained], [acc], marker="*", ms=16, color=color, mec="black", zorder=5)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [format_length(n) for n in lengths])
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("context length (tokens); dotted line and star: the length each model was trained at")
    ax.set_ylabel("passkey accuracy (teacher-forced)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    # Below the axes: lines cross the whole plot, so any legend inside it hides some of them.
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    if curves:
        _plot_curves(cax, series, curves, colors)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=HEATMAP_DPI)
    plt.close(fig)
    return path


def _plot_curves(ax, series: dict[str, dict], curves: dict[str, list[dict]], colors: list[str]) -> None:
    order = list(series)
    lengths = sorted({int(n) for pts in curves.values() for p in pts for n in p["accuracy"]})
    styles = ["-", "--", ":", "-."]
    for label, pts in curves.items():
        color = colors[order.index(label) % len(colors)] if label in order else None
        for j, n in enumerate(lengths):
            xy = [(p["step"], p["accuracy"][str(n)]) for p in pts if str(n) in p["accuracy"]]
            if xy:
                ax.plot([x for x, _ in xy], [y for _, y in xy], marker=".", ls=styles[j % len(styles)], color=color)
    for j, n in enumerate(lengths):  # a legend of line styles (colours are the left panel's)
        ax.plot([], [], ls=styles[j % len(styles)], color="gray", label=f"at {format_length(n)} tokens")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("training step of the stage (0: the model it starts from)")
    ax.set_ylabel("passkey accuracy (teacher-forced)")
    ax.set_title("learning curves (colours as on the left)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)


def plot_perplexity(path: str, records: Sequence[dict]) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=HEATMAP_SIZE, dpi=HEATMAP_DPI)
    for length in sorted({r["length"] for r in records}):
        pts = [((r["start"] + r["end"]) / 2, r["ppl"]) for r in records if r["length"] == length and r["tokens"]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"window {format_length(length)}")
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=HEATMAP_DPI)
    plt.close(fig)


def write_task_results(out_dir: str, settings: dict, records: list[dict], aggregates: dict, depth_tasks) -> str:
    """Write JSON, CSVs and plots for a task grid; returns the directory."""
    with staged_directory(out_dir, replace=True) as tmp:
        with open(tmp / "results.json", "w", encoding="utf-8") as fh:
            json.dump({"settings": settings, "aggregates": aggregates, "records": records}, fh, indent=1)
        _write_csv(tmp / "records.csv", records)
        _write_csv(tmp / "summary.csv", aggregates["by_cell"])
        for task in sorted({c["task"] for c in aggregates["by_cell"]}):
            if task in depth_tasks:
                cells = [c for c in aggregates["by_cell"] if c["task"] == task]
                plot_heatmap(str(tmp / f"heatmap_{task}.png"), cells, task)
        plot_accuracy_vs_length(str(tmp / "accuracy_vs_length.png"), aggregates["by_length"])
    return out_dir


def write_perplexity_results(out_dir: str, settings: dict, records: list[dict]) -> str:
    with staged_directory(out_dir, replace=True) as tmp:
        with open(tmp / "results.json", "w", encoding="utf-8") as fh:
            json.dump({"settings": settings, "records": records}, fh, indent=1)
        _write_csv(tmp / "perplexity.csv", records)
        plot_perplexity(str(tmp / "perplexity_vs_position.png"), records)
    return out_dir


def summary_table(aggregates: dict, depth_tasks) -> str:
    """One screen: depth × length for depth-gridded tasks, then task × length (+ mean) for all."""
    lines = []
    lengths = sorted({r["length"] for r in aggregates["by_length"]})
    head = "".join(f"{format_length(n):>8}" for n in lengths)
    for task in sorted({c["task"] for c in aggregates["by_cell"] if c["task"] in depth_tasks}):
        cells = {(c["depth_percent"], c["length"]): c["score"] for c in aggregates["by_cell"] if c["task"] == task}
        lines.append(f"{task} (rows: depth %, columns: context length)")
        lines.append(f"{'depth':>8}{head}")
        for d in sorted({k[0] for k in cells}):
            lines.append(f"{d:>8g}" + "".join(f"{cells.get((d, n), math.nan):>8.2f}" for n in lengths))
        lines.append("")
    by_len = {(r["task"], r["length"]): r["score"] for r in aggregates["by_length"]}
    lines.append(f"{'task':<18}{head}{'mean':>8}")
    for r in aggregates["by_task"]:
        row = "".join(f"{by_len.get((r['task'], n), math.nan):>8.2f}" for n in lengths)
        lines.append(f"{r['task']:<18}{row}{r['score']:>8.2f}")
    return "\n".join(lines)


def perplexity_table(records: Sequence[dict]) -> str:
    lengths = sorted({r["length"] for r in records})
    buckets = max(r["bucket"] for r in records) + 1
    lines = ["perplexity by position bucket (rows: window length, columns: bucket of the window)"]
    lines.append(f"{'length':>8}" + "".join(f"{'b' + str(b):>9}" for b in range(buckets)))
    for n in lengths:
        row = {r["bucket"]: r["ppl"] for r in records if r["length"] == n}
        lines.append(f"{format_length(n):>8}" + "".join(f"{row.get(b, math.nan):>9.3g}" for b in range(buckets)))
    return "\n".join(lines)

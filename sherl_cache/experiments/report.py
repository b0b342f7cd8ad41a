"""Plots and a table for a sweep folder, finished or still running.

Reads only what is on disk (``sweep.json`` and the trial folders, via ``results.collect_rows``),
so it can be run while a sweep is going and shows every trial finished so far. Needs
matplotlib, the optional ``plots`` extra; everything else in sherl-cache works without it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MissingDependencyError, RunError
from ..training.rundir import RunDir
from .results import collect_rows, format_summary, load_spec, ranked


@dataclass
class Report:
    folder: Path
    plots: list[Path]
    table: str
    rows: list[dict[str, Any]]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MissingDependencyError(
            "plots need matplotlib: pip install 'sherl-cache[plots]'"
        ) from None
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def write_report(sweep_dir: Path, out: Path | None = None, top: int = 5) -> Report:
    """Write PNGs into ``out`` (default ``<sweep_dir>/report``); return them and the table.

    Plots: the main metric per value of each swept key (every trial a point, coloured by seed,
    with the mean ± std over trials sharing the value), validation curves of the ``top``
    trials, and peak memory against the metric.
    """
    sweep_dir = Path(sweep_dir)
    spec = load_spec(sweep_dir)
    plt = _pyplot()
    rows = collect_rows(sweep_dir, spec)  # from the folders: a running sweep's table is stale
    metric, swept = spec["main_metric"], list(spec["swept"])
    table = format_summary(rows, swept, metric)
    good = ranked(rows, metric)
    if not good:
        raise RunError(f"no trial of {sweep_dir} has completed yet; nothing to plot")
    folder = Path(out) if out is not None else sweep_dir / "report"
    folder.mkdir(parents=True, exist_ok=True)
    plots = []
    for key in swept:
        if key == "seed" and len(swept) > 1:
            continue  # seeds are the spread of the other plots, not a setting to compare
        plots.append(
            _metric_by_value(plt, good, key, metric, folder / f"{metric}_by_{_safe(key)}.png")
        )
    plots.append(
        _learning_curves(plt, good[:top], sweep_dir, metric, folder / "learning_curves.png")
    )
    plots.append(_memory_vs_metric(plt, good, swept, metric, folder / "memory_vs_metric.png"))
    (folder / "table.txt").write_text(table + "\n")
    return Report(folder, plots, table, rows)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)


def _numeric(values: Sequence[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _metric_by_value(
    plt, rows: Sequence[Mapping[str, Any]], key: str, metric: str, path: Path
) -> Path:
    values = sorted(
        {r.get(key) for r in rows}, key=lambda v: (v is None, str(v) if not _numeric([v]) else v)
    )
    numeric = _numeric(values)
    position = {v: (v if numeric else i) for i, v in enumerate(values)}
    fig, ax = plt.subplots(figsize=(6, 4))
    seeds = sorted({r.get("seed") for r in rows}, key=str)
    colours = plt.get_cmap("tab10")
    for s, seed in enumerate(seeds):
        points = [r for r in rows if r.get("seed") == seed]
        ax.scatter(
            [position[r.get(key)] for r in points],
            [r[metric] for r in points],
            s=18,
            alpha=0.7,
            color=colours(s % 10),
            label=f"seed {seed}",
        )
    means, stds = [], []
    for v in values:
        scores = [
            r[metric] for r in rows if r.get(key) == v and isinstance(r.get(metric), (int, float))
        ]
        means.append(sum(scores) / len(scores))
        stds.append(_std(scores))
    ax.errorbar(
        [position[v] for v in values],
        means,
        yerr=stds,
        color="black",
        marker="_",
        markersize=14,
        capsize=4,
        linestyle="-" if numeric else "none",
        label="mean ± std",
    )
    if numeric and key in ("lr", "weight_decay") and min(values) > 0:
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(range(len(values)), [str(v) for v in values])
    ax.set_xlabel(key)
    ax.set_ylabel(_axis(rows, metric))
    ax.set_title(f"{metric} by {key}")
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def _std(scores: Sequence[float]) -> float:
    if len(scores) < 2:
        return 0.0
    mean = sum(scores) / len(scores)
    return math.sqrt(sum((s - mean) ** 2 for s in scores) / (len(scores) - 1))


def _learning_curves(
    plt, rows: Sequence[Mapping[str, Any]], sweep_dir: Path, metric: str, path: Path
) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        metrics = RunDir(sweep_dir / row["path"]).read_metrics() or {}
        epochs = [e for e in metrics.get("epochs", []) if metric in e]
        ax.plot(
            [e["epoch"] for e in epochs],
            [e[metric] for e in epochs],
            marker="o",
            markersize=3,
            label=row["trial"],
        )
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel(f"{metric} on the selection data")
    ax.set_title(f"learning curves of the top {len(rows)} trial(s)")
    ax.legend(fontsize=6)
    return _save(plt, fig, path)


def _memory_vs_metric(
    plt, rows: Sequence[Mapping[str, Any]], swept: Sequence[str], metric: str, path: Path
) -> Path:
    """The accuracy-memory frontier: one point per setting of the swept keys other than the
    seed, at the mean over seeds, with the std as error bars and the setting as its label."""
    others = [k for k in swept if k != "seed"]
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in others), []).append(row)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, members in groups.items():
        memory = [(r.get("peak_memory_bytes") or 0) / 2**20 for r in members]
        scores = [r[metric] for r in members]
        x, y = sum(memory) / len(memory), sum(scores) / len(scores)
        ax.errorbar(x, y, xerr=_std(memory), yerr=_std(scores), marker="o", markersize=4, capsize=3)
        label = (
            " ".join(f"{k}={v}" for k, v in zip(others, key, strict=True)) or members[0]["trial"]
        )
        ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"peak training memory (MiB, {rows[0].get('device') or 'device'})")
    ax.set_ylabel(_axis(rows, metric) + (" mean ± std over seeds" if "seed" in swept else ""))
    ax.set_title(f"{metric} against memory")
    return _save(plt, fig, path)


def _axis(rows: Sequence[Mapping[str, Any]], metric: str) -> str:
    """A metric axis says what it was measured on: held out, or the biased same split."""
    shown = rows[0].get("reported_on") or "validation"
    if rows[0].get("protocol", "same") == "same":
        return f"{metric} on {shown} (chosen on it too: biased)"
    return f"held-out {metric} ({shown})"


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

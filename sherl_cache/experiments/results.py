"""A sweep's results: the spec file, the table of finished trials, and its summary.

Rows are read from the trial folders rather than remembered, so the table is the same after a
resume and ``report`` works on a sweep that is still running. Nothing here imports torch:
``report`` and ``--help`` stay light.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import RunError
from ..training.rundir import RunDir, read_json

SPEC_FILE = "sweep.json"
RESULTS_FILE = "results.parquet"
SPEC_FORMAT = "sherl-cache-sweep"
SPEC_VERSION = 1


def format_value(value: Any) -> str:
    """A swept value as trial ids and tables spell it."""
    if value is None:
        return "none"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def trial_folder(out: Path, trial: str) -> Path:
    return Path(out) / "trials" / trial


def status_file(out: Path, trial: str) -> Path:
    """Outcome of the trial's last attempt (ok/failed, error, time)."""
    return Path(out) / "status" / f"{trial}.json"


def load_spec(out: Path) -> dict[str, Any]:
    spec = read_json(Path(out) / SPEC_FILE)
    if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT:
        raise RunError(
            f"{out} is not a sweep folder (no readable {SPEC_FILE}); make one with: "
            f"sherl-cache sweep --out {out} --cache CACHE --grid key=v1,v2"
        )
    return spec


def collect_rows(out: Path, spec: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per finished trial (complete or failed), read from disk, in the spec's order.

    Reading the folders rather than remembering outcomes makes the table the same after a
    resume, and lets ``report`` work on a sweep that is still running.
    """
    out = Path(out)
    spec = spec or load_spec(out)
    rows = []
    for entry in spec["trials"]:
        tid = entry["id"]
        status = read_json(status_file(out, tid)) or {}
        row: dict[str, Any] = {"trial": tid, **entry["values"]}
        metrics = RunDir(trial_folder(out, tid)).read_metrics()
        if metrics is not None:
            row |= {"status": "ok", "error": None} | metric_columns(metrics)
            row |= {
                "peak_memory_bytes": metrics.get("peak_memory_bytes"),
                "train_seconds": metrics.get("train_seconds"),
                "seconds": status.get("seconds") if status.get("status") == "ok" else None,
                "step_seconds_median": metrics.get("step_seconds_median"),
                "trainable_params": metrics.get("trainable_params"),
                "epochs_run": len(metrics.get("epochs", [])),
                "device": metrics.get("device"),
            }
        elif status.get("status") == "failed":
            row |= {
                "status": "failed",
                "error": status.get("error"),
                "seconds": status.get("seconds"),
            }
        else:
            continue  # not run yet, or running now
        row["path"] = str(trial_folder(Path(), tid))
        rows.append(row)
    return rows


def metric_columns(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A run's figures as table columns: the reported (held-out) metrics under their own
    names, the ones its epoch was chosen by as ``select_<name>``, and where each came from.

    Runs written before held-out selection existed (no ``reported``) chose and reported on
    the same split; their figures are kept under both names and marked biased.
    """
    best = dict(metrics.get("best") or {})
    epoch, loss = best.pop("epoch", None), best.pop("loss", None)
    reported = dict(metrics.get("reported", best) or {})
    reported.pop("epoch", None)
    chosen, shown = metrics.get("selected_on"), metrics.get("reported_on")
    return {
        "best_epoch": epoch,
        "best_loss": loss,
        **reported,
        **{f"{SELECTED}{k}": v for k, v in best.items()},
        "protocol": metrics.get("protocol", "same"),
        "selected_on": _where(chosen),
        "reported_on": _where(shown),
    }


def _where(part: Mapping[str, Any] | None) -> str | None:
    return None if not part else f"{part['split']}[{part['examples']}]"


def write_results(out: Path) -> list[dict[str, Any]]:
    """Rewrite ``<out>/results.parquet`` from the trial folders; returns its rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = collect_rows(out)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    table = (
        pa.table({name: [row.get(name) for row in rows] for name in columns})
        if rows
        else pa.table({})
    )
    path = Path(out) / RESULTS_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return rows


def read_results(out: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(Path(out) / RESULTS_FILE).to_pylist()


# --- summaries -----------------------------------------------------------------------------


def _score(row: Mapping[str, Any], metric: str) -> float:
    value = row.get(metric)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else -math.inf


def ranked(rows: Sequence[Mapping[str, Any]], metric: str) -> list[Mapping[str, Any]]:
    """Complete trials, best first by the main metric as measured on the *selection* data
    (every GLUE metric: higher is better): ranking trials by their reported figure would
    choose on the report set again."""
    return sorted(
        (r for r in rows if r.get("status") == "ok"), key=lambda r: -_score(r, _chooser(r, metric))
    )


def _chooser(row: Mapping[str, Any], metric: str) -> str:
    return SELECTED + metric if SELECTED + metric in row else metric


def seed_groups(
    rows: Sequence[Mapping[str, Any]], swept: Sequence[str], metric: str
) -> list[dict[str, Any]]:
    """Mean and sample std of ``metric`` over seeds for each setting of the other swept keys."""
    others = [k for k in swept if k != "seed"]
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in ranked(rows, metric):
        groups.setdefault(tuple(row.get(k) for k in others), []).append(row)
    summary = []
    for key, members in groups.items():
        scores = [_score(r, metric) for r in members]
        summary.append(
            {
                "values": dict(zip(others, key, strict=True)),
                "mean": statistics.fmean(scores),
                "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                "n": len(scores),
                # Settings are ranked by the selection data, as trials are.
                "select_mean": statistics.fmean(_score(r, _chooser(r, metric)) for r in members),
            }
        )
    return sorted(summary, key=lambda g: -g["select_mean"])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3g}"
    return str(value)


def _mib(n: Any) -> str:
    return f"{n / 2**20:.1f}" if isinstance(n, (int, float)) else "-"


def format_summary(
    rows: Sequence[Mapping[str, Any]], swept: Sequence[str], metric: str, limit: int | None = None
) -> str:
    """The ranked table, failures, the best configuration and, when seeds are swept, mean ± std."""
    best_rows = ranked(rows, metric)
    others = sorted(
        {k for r in best_rows for k in r if k not in _NON_METRIC and k not in swept and k != metric}
    )
    header = ["rank", *swept, metric, *others, "epoch", "mem MiB", "time s"]
    lines = [header]
    for rank, row in enumerate(best_rows[:limit] if limit else best_rows, start=1):
        seconds = row.get("seconds") if row.get("seconds") is not None else row.get("train_seconds")
        lines.append(
            [
                str(rank),
                *(format_value(row.get(k)) for k in swept),
                _cell(row.get(metric)),
                *(_cell(row.get(k)) for k in others),
                _cell(row.get("best_epoch")),
                _mib(row.get("peak_memory_bytes")),
                f"{seconds:.1f}" if seconds is not None else "-",
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]
    failed = [r for r in rows if r.get("status") == "failed"]
    if failed:
        text.append(f"failed: {len(failed)} trial(s)")
        text += [f"  {r['trial']}: {r.get('error')}" for r in failed]
    if not best_rows:
        text.append("no trial completed")
        return "\n".join(text)
    top = best_rows[0]
    text.append(
        f"best trial by {_chooser(top, metric)}: {top['trial']} "
        f"({metric} {_cell(top.get(metric))} on {top.get('reported_on') or 'validation'}) "
        f"in {top['path']}"
    )
    if top.get("protocol") == "same":
        text.append("chosen and reported on the same data (--select-on same): biased upward")
    if "seed" in swept:
        groups = seed_groups(rows, swept, metric)
        text.append(f"mean ± std of {metric} over seeds:")
        for g in groups:
            setting = " ".join(f"{k}={format_value(v)}" for k, v in g["values"].items()) or "(all)"
            text.append(f"  {setting}: {g['mean']:.4f} ± {g['std']:.4f} (n={g['n']})")
        g = groups[0]
        setting = " ".join(f"{k}={format_value(v)}" for k, v in g["values"].items()) or "(all)"
        spread = f"{g['mean']:.4f} ± {g['std']:.4f} over {g['n']} seed(s)"
        text.append(f"best configuration: {setting} ({metric} {spread})")
    else:
        setting = " ".join(f"{k}={format_value(top.get(k))}" for k in swept)
        text.append(f"best configuration: {setting}")
    return "\n".join(text)


# Row columns that are not metrics (everything else in a complete row is a metric at the
# chosen epoch: reported, or ``select_``-prefixed for the selection data).
_NON_METRIC = {
    "trial",
    "status",
    "error",
    "best_epoch",
    "best_loss",
    "peak_memory_bytes",
    "train_seconds",
    "seconds",
    "step_seconds_median",
    "trainable_params",
    "epochs_run",
    "device",
    "path",
    "protocol",
    "selected_on",
    "reported_on",
}
SELECTED = "select_"  # prefix of the columns holding what a trial's epoch was chosen by

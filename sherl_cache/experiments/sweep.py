"""Sweeps: many training trials over one cache, in this process or on a dask cluster.

The backbone pass is the expensive part of SHERL training, and the cache pays it once; a
sweep is where that pays off, since every trial reads the same cache. A sweep is a list of
``TrainConfig`` that differ only in the swept values (a grid, or random samples over
ranges). Each trial runs ``training.train`` unchanged, so a trial's folder and numbers are
exactly those of ``sherl-cache train`` with the same options.

Layout of a sweep folder::

    <out>/sweep.json            the spec: swept keys, fixed values, every trial's values
    <out>/trials/<id>/          one run folder per trial, as written by ``sherl-cache train``
    <out>/status/<id>.json      outcome of the trial's last attempt (ok/failed, error, time)
    <out>/results.parquet       one row per finished trial, rewritten as trials finish

A trial is complete when its run folder holds metrics.json (``train`` writes it last), so
``--resume`` skips exactly those and reruns everything else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import itertools
import json
import logging
import math
import os
import random
import re
import socket
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..cluster import connect
from ..config.train import TrainConfig
from ..config.values import Range, parse_value, unique
from ..errors import ConfigError, RunError
from ..store.cache import Cache, open_cache
from ..training.recipe import resolve_taps, task_of, train

SPEC_FILE = "sweep.json"
RESULTS_FILE = "results.parquet"
SPEC_FORMAT = "sherl-cache-sweep"
SPEC_VERSION = 1


def _format(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def trial_id(values: Mapping[str, Any]) -> str:
    """A readable, file-safe folder name from a trial's swept values, e.g. ``lr=0.003_seed=1``."""
    text = "_".join(f"{key}={_format(value)}" for key, value in values.items()) or "trial"
    safe = re.sub(r"[^A-Za-z0-9_.,=+-]+", "-", text)
    if len(safe) > 96:  # keep paths short; the digest keeps long ids distinct
        safe = f"{safe[:80]}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"
    return safe


@dataclass(frozen=True)
class Trial:
    """One point of a sweep: its folder name, its swept values and the full TrainConfig."""

    id: str
    values: Mapping[str, Any]
    config: TrainConfig


@dataclass(frozen=True)
class SweepConfig:
    """Everything ``sherl-cache sweep`` takes; validated on creation, errors name the flag.

    ``grid`` maps TrainConfig fields to value lists (all combinations run). With ``random``,
    that many points are sampled instead (``ranges`` sampled, other grid keys picked at
    random), and a swept ``seed`` is crossed with every point so each sampled configuration
    gets a mean over seeds. ``fixed`` holds values every trial shares (epochs, batch size).
    ``workers`` > 0 runs trials on a local dask cluster; ``scheduler`` on an existing one.
    """

    cache: str
    out: Path
    grid: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    ranges: Sequence[Range] = ()
    random: int | None = None
    random_seed: int = 0
    fixed: Mapping[str, Any] = field(default_factory=dict)
    task: str | None = None
    workers: int = 0
    scheduler: str | None = None
    resume: bool = False
    connect_timeout: float = 5.0

    def __post_init__(self) -> None:
        grid = {}
        for key, values in self.grid.items():
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
                values = [values]
            if not values:
                raise ConfigError(f"--grid {key} lists no values (expected {key}=v1,v2,...)")
            grid[key] = unique([parse_value(key, value, "--grid") for value in values])
        fixed = {key: parse_value(key, value, "--set") for key, value in self.fixed.items()}
        ranges = tuple(self.ranges)
        range_keys = [r.key for r in ranges]
        repeated = sorted(
            {k for k in range_keys if range_keys.count(k) > 1} | (set(grid) & set(range_keys))
        )
        checks = [
            (not repeated, f"--range/--grid give {', '.join(repeated)} more than once"),
            (
                not set(fixed) & (set(grid) | set(range_keys)),
                f"{', '.join(sorted(set(fixed) & (set(grid) | set(range_keys))))} is both swept "
                "(--grid/--range) and fixed (--set or its own flag); drop one",
            ),
            (
                self.random is None or self.random >= 1,
                f"--random must be at least 1, got {self.random}",
            ),
            (not ranges or self.random is not None, "--range needs --random N (how many samples)"),
            (
                bool(grid) or self.random is not None,
                "empty sweep: pass at least one --grid key=v1,v2,... (or --random N with --range)",
            ),
            (
                self.random is None or bool(ranges) or bool(set(grid) - {"seed"}),
                "--random N needs something to sample: a --range key=low:high or a --grid key",
            ),
            (self.workers >= 0, f"--workers must be 0 (run here) or more, got {self.workers}"),
            (
                not (self.workers and self.scheduler),
                "pass --workers N or --scheduler ADDRESS, not both",
            ),
            (self.connect_timeout > 0, "the scheduler connect timeout must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        object.__setattr__(self, "grid", grid)
        object.__setattr__(self, "fixed", fixed)
        object.__setattr__(self, "ranges", ranges)
        object.__setattr__(self, "out", Path(self.out))

    @property
    def swept(self) -> list[str]:
        """Swept keys in the order trial ids and table columns use."""
        if self.random is None:
            return list(self.grid)
        keys = [k for k in self.grid if k != "seed"] + [r.key for r in self.ranges]
        return keys + (["seed"] if "seed" in self.grid else [])

    def points(self) -> list[dict[str, Any]]:
        if self.random is None:
            return [
                dict(zip(self.grid, combo, strict=True))
                for combo in itertools.product(*self.grid.values())
            ]
        rng = random.Random(self.random_seed)
        points = []
        for _ in range(self.random):
            point = {key: rng.choice(values) for key, values in self.grid.items() if key != "seed"}
            point |= {r.key: r.sample(rng) for r in self.ranges}
            points.append(point)
        seeds = self.grid.get("seed")
        return [p | {"seed": s} for p in points for s in seeds] if seeds else points

    def trials(self) -> list[Trial]:
        """Every trial's TrainConfig, built (and so validated) before any trial runs."""
        trials: dict[str, Trial] = {}
        for values in self.points():
            tid = trial_id(values)
            if tid in trials:
                continue  # a random sample drawn twice
            try:
                config = TrainConfig(
                    cache=_absolute(self.cache),
                    out=Path(self.out).absolute() / "trials" / tid,
                    task=self.task,
                    **(dict(self.fixed) | values),
                )
            except ConfigError as exc:
                raise ConfigError(f"trial {tid} (--grid/--range/--set): {exc}") from None
            trials[tid] = Trial(tid, values, config)
        return list(trials.values())


def _absolute(path: str) -> str:
    """Workers may run elsewhere (another cwd): hand them absolute paths."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


# --- running one trial ----------------------------------------------------------------------


def _one_line(exc: BaseException, limit: int = 500) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def run_trial(
    config: dict[str, Any], status_path: str, *, threads: int | None = None, pin_gpu: bool = False
) -> dict[str, Any]:
    """Train one trial and record its outcome in ``status_path``; never raises ``Exception``.

    Takes the config as a plain dict, so a dask task graph carries a few hundred bytes; the
    worker opens the cache read-only by its path. Any exception becomes a failed outcome:
    one bad trial must not stop the others.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)  # one trial per worker process; no oversubscription
    if pin_gpu and torch.cuda.is_available():
        from distributed import get_worker

        torch.cuda.set_device(int(get_worker().name) % torch.cuda.device_count())
    began = time.perf_counter()
    try:
        train(TrainConfig.from_dict(config), progress=False)
        outcome: dict[str, Any] = {"status": "ok", "error": None}
    except Exception as exc:  # noqa: BLE001 - recorded per trial, reported in the table
        outcome = {"status": "failed", "error": _one_line(exc)}
    outcome |= {
        "seconds": time.perf_counter() - began,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "finished": _now(),
    }
    _write_json(Path(status_path), outcome)
    return outcome


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)  # readers (report on a running sweep) never see half a file


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --- executors ---------------------------------------------------------------------------------

Job = tuple[Trial, dict[str, Any]]
Runner = Callable[[Sequence[Job]], Iterator[tuple[Trial, dict[str, Any]]]]


@contextlib.contextmanager
def _local_runner() -> Iterator[Runner]:
    def run(jobs: Sequence[Job]) -> Iterator[tuple[Trial, dict[str, Any]]]:
        for trial, kwargs in jobs:
            yield trial, run_trial(**kwargs)

    yield run


def _local_gpus(config: SweepConfig) -> int:
    if config.fixed.get("device", "auto") == "cpu":
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@contextlib.contextmanager
def _dask_runner(config: SweepConfig, report: Callable[[str], None]) -> Iterator[Runner]:
    from distributed import LocalCluster, as_completed

    cluster = None
    if config.scheduler:
        client = connect(config.scheduler, config.connect_timeout)
        workers = client.scheduler_info().get("workers", {})
        gpu = any("GPU" in w.get("resources", {}) for w in workers.values())
        threads, pin = None, False
        if not workers:
            report(f"scheduler {config.scheduler} has no workers yet; trials wait for one")
    else:
        gpus = _local_gpus(config)
        count = min(config.workers, gpus) if gpus else config.workers
        cluster = LocalCluster(
            n_workers=count,
            processes=True,
            threads_per_worker=1,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",  # never exposed beyond this machine
            resources={"GPU": 1} if gpus else None,
            silence_logs=logging.ERROR,
        )
        from distributed import Client

        client = Client(cluster, set_as_default=False)
        gpu, threads, pin = bool(gpus), 1, bool(gpus)
        report(f"local dask cluster: {count} worker process(es){', one per GPU' if gpus else ''}")
    try:

        def run(jobs: Sequence[Job]) -> Iterator[tuple[Trial, dict[str, Any]]]:
            futures = {
                client.submit(
                    run_trial,
                    **kwargs,
                    threads=threads,
                    pin_gpu=pin,
                    key=f"trial-{trial.id}",
                    pure=False,
                    resources={"GPU": 1} if gpu else None,
                ): (trial, kwargs)
                for trial, kwargs in jobs
            }
            for future in as_completed(futures, loop=client.loop):
                trial, kwargs = futures[future]
                try:
                    outcome = future.result()
                except Exception as exc:  # noqa: BLE001 - e.g. the worker died (KilledWorker)
                    outcome = {"status": "failed", "error": _one_line(exc), "seconds": None}
                    _write_json(Path(kwargs["status_path"]), outcome | {"finished": _now()})
                yield trial, outcome

        yield run
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


# --- the sweep -------------------------------------------------------------------------------


@dataclass
class SweepResult:
    """What ``run_sweep`` did: the table's rows, what was swept, and how many trials ran."""

    out: Path
    rows: list[dict[str, Any]]
    swept: list[str]
    main_metric: str
    ran: int
    skipped: int

    @property
    def table(self) -> Path:
        return self.out / RESULTS_FILE


def run_sweep(config: SweepConfig, report: Callable[[str], None] = lambda _: None) -> SweepResult:
    """Run every trial not yet complete; write ``results.parquet``; return the table's rows.

    Everything that can be checked is checked before the first trial starts: the values, the
    cache and task, the out folder, the trials already done (on ``--resume``) and the cluster.
    """
    trials = config.trials()
    cache = open_cache(_absolute(config.cache))
    task = task_of(cache, config.task)
    out = config.out
    if out.exists() and any(out.iterdir()) and not config.resume:
        raise RunError(
            f"--out {out} already holds a sweep; pass --resume to continue it (complete trials "
            "are kept) or choose another --out"
        )
    done, todo = _partition(trials, cache)
    distributed = (config.workers or config.scheduler) and todo  # no cluster for nothing to do
    runner = _dask_runner(config, report) if distributed else _local_runner()
    with runner as run:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / SPEC_FILE, _spec(config, trials, cache, task.main_metric))
        if done:
            report(f"--resume: {len(done)} of {len(trials)} trials already complete, skipped")
        jobs = []
        for trial in todo:
            status = out / "status" / f"{trial.id}.json"
            status.unlink(missing_ok=True)  # a stale failure must not outlive its rerun
            folder = trial.config.out
            rerun = folder.exists() and any(folder.iterdir())  # interrupted: train must replace it
            cfg = dataclasses.replace(trial.config, overwrite=True) if rerun else trial.config
            jobs.append((trial, {"config": cfg.to_dict(), "status_path": str(status)}))
        for count, (trial, outcome) in enumerate(run(jobs), start=1):
            text = _outcome_text(trial, outcome, task.main_metric)
            report(f"[{count}/{len(jobs)}] {trial.id}: {text}")
            write_results(out)  # a partial table survives an interrupted sweep
    rows = write_results(out)
    return SweepResult(out, rows, config.swept, task.main_metric, ran=len(jobs), skipped=len(done))


def _outcome_text(trial: Trial, outcome: Mapping[str, Any], metric: str) -> str:
    seconds = f" ({outcome['seconds']:.1f} s)" if outcome.get("seconds") is not None else ""
    if outcome["status"] != "ok":
        return f"FAILED{seconds}: {outcome['error']}"
    metrics = read_json(trial.config.out / "metrics.json") or {}
    value = metrics.get("best", {}).get(metric)
    return (f"{metric} {value:.4f}" if isinstance(value, (int, float)) else "ok") + seconds


def _spec(
    config: SweepConfig, trials: Sequence[Trial], cache: Cache, metric: str
) -> dict[str, Any]:
    return {
        "format": SPEC_FORMAT,
        "format_version": SPEC_VERSION,
        "cache": _absolute(config.cache),
        "cache_key": cache.manifest["key"],
        "task": cache.manifest["task"]["name"],
        "main_metric": metric,
        "swept": config.swept,
        "grid": {k: list(v) for k, v in config.grid.items()},
        "ranges": {r.key: r.to_text() for r in config.ranges},
        "random": config.random,
        "random_seed": config.random_seed,
        "fixed": dict(config.fixed),
        "trials": [{"id": t.id, "values": dict(t.values)} for t in trials],
        "updated": _now(),
    }


# Fields whose recorded value legitimately differs between runs of the same trial.
_UNCOMPARED = ("cache", "out", "overwrite", "tap", "model", "device", "task")


def _partition(trials: Sequence[Trial], cache: Cache) -> tuple[list[Trial], list[Trial]]:
    """Split into complete trials (checked to be the same trial) and ones to (re)run."""
    done, todo = [], []
    for trial in trials:
        folder = trial.config.out
        if not (folder / "metrics.json").is_file():
            todo.append(trial)
            continue
        recorded = read_json(folder / "config.json") or {}
        wanted = trial.config.to_dict()
        with contextlib.suppress(ConfigError):
            wanted["tap"] = list(resolve_taps(trial.config.tap, cache, trial.config.late_layers))
        wanted["cache_key"] = cache.manifest["key"]
        for key in [f.name for f in fields(TrainConfig) if f.name not in _UNCOMPARED] + [
            "tap",
            "cache_key",
        ]:
            if recorded.get(key) != wanted[key]:
                raise RunError(
                    f"trial {trial.id} in {folder} was run with {key}={recorded.get(key)!r}, but "
                    f"this sweep asks for {wanted[key]!r}; use another --out for a different sweep"
                )
        done.append(trial)
    return done, todo


# --- the results table -----------------------------------------------------------------------


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
        folder = out / "trials" / tid
        status = read_json(out / "status" / f"{tid}.json") or {}
        row: dict[str, Any] = {"trial": tid, **entry["values"]}
        metrics = read_json(folder / "metrics.json")
        if isinstance(metrics, dict):
            best = dict(metrics.get("best") or {})
            row |= {
                "status": "ok",
                "error": None,
                "best_epoch": best.pop("epoch", None),
                "best_loss": best.pop("loss", None),
            }
            row |= best
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
        row["path"] = str(Path("trials") / tid)
        rows.append(row)
    return rows


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
    """Complete trials, best first by the main metric (every GLUE metric: higher is better)."""
    return sorted((r for r in rows if r.get("status") == "ok"), key=lambda r: -_score(r, metric))


def seed_groups(
    rows: Sequence[Mapping[str, Any]], swept: Sequence[str], metric: str
) -> list[dict[str, Any]]:
    """Mean and sample std of ``metric`` over seeds for each setting of the other swept keys."""
    others = [k for k in swept if k != "seed"]
    groups: dict[tuple, list[float]] = {}
    for row in ranked(rows, metric):
        groups.setdefault(tuple(row.get(k) for k in others), []).append(_score(row, metric))
    summary = [
        {
            "values": dict(zip(others, key, strict=True)),
            "mean": statistics.fmean(scores),
            "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
            "n": len(scores),
        }
        for key, scores in groups.items()
    ]
    return sorted(summary, key=lambda g: -g["mean"])


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
                *(_format(row.get(k)) for k in swept),
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
    text.append(f"best trial: {top['trial']} ({metric} {_cell(top.get(metric))}) in {top['path']}")
    if "seed" in swept:
        groups = seed_groups(rows, swept, metric)
        text.append(f"mean ± std of {metric} over seeds:")
        for g in groups:
            setting = " ".join(f"{k}={_format(v)}" for k, v in g["values"].items()) or "(all)"
            text.append(f"  {setting}: {g['mean']:.4f} ± {g['std']:.4f} (n={g['n']})")
        g = groups[0]
        setting = " ".join(f"{k}={_format(v)}" for k, v in g["values"].items()) or "(all)"
        spread = f"{g['mean']:.4f} ± {g['std']:.4f} over {g['n']} seed(s)"
        text.append(f"best configuration: {setting} ({metric} {spread})")
    else:
        setting = " ".join(f"{k}={_format(top.get(k))}" for k in swept)
        text.append(f"best configuration: {setting}")
    return "\n".join(text)


# Row columns that are not metrics (everything else in a complete row is a best-epoch metric).
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
}

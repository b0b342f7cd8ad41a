"""Sweeps: many training trials over one cache, in this process or on a dask cluster.

The backbone pass is the expensive part of SHERL training, and the cache pays it once; a
sweep is where that pays off, since every trial reads the same cache. A sweep is a list of
``TrainConfig`` that differ only in the swept values (a grid, or random samples over
ranges). Each trial runs ``training.train`` unchanged, so a trial's folder and numbers are
exactly those of ``sherl-cache train`` with the same options. Local sweeps fuse trials that
read the same batches (``training.fused``): one read and decode of each batch for all of them,
the same folders and numbers as lone runs (tested).

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
import os
import random
import re
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..cluster import cluster_client
from ..config.train import TrainConfig
from ..config.values import Range, parse_value, unique
from ..errors import ConfigError, RunError
from ..store.cache import Cache, open_cache
from ..training.discovery import family_of_cache, task_of
from ..training.model import with_family_defaults
from ..training.recipe import run_taps, train
from ..training.rundir import CONFIG_FILE, RunDir
from .results import (
    RESULTS_FILE,
    SPEC_FILE,
    SPEC_FORMAT,
    SPEC_VERSION,
    format_summary,
    format_value,
    read_results,
    status_file,
    trial_folder,
    write_results,
)

# The CLI and pipelines take the table's readers from here, with the sweep that writes it.
__all__ = [
    "SweepConfig",
    "SweepResult",
    "Trial",
    "format_summary",
    "read_results",
    "run_sweep",
    "run_trial",
    "trial_id",
]


def trial_id(values: Mapping[str, Any]) -> str:
    """A readable, file-safe folder name from a trial's swept values, e.g. ``lr=0.003_seed=1``."""
    text = "_".join(f"{key}={format_value(value)}" for key, value in values.items()) or "trial"
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
    ``fuse`` (local runs) trains trials that read the same batches together
    (``training.fused``): same results, each batch read and decoded once.
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
    fuse: bool = True

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
                    out=trial_folder(Path(self.out).absolute(), tid),
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
    config: dict[str, Any], status_path: str, *, threads: int | None = None
) -> dict[str, Any]:
    """Train one trial and record its outcome in ``status_path``; never raises ``Exception``.

    Takes the config as a plain dict, so a dask task graph carries a few hundred bytes; the
    worker opens the cache read-only by its path. Any exception becomes a failed outcome:
    one bad trial must not stop the others. A local cluster's worker sees only its own GPU
    (``cluster.py``), so no device is picked here.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)  # one trial per worker process; no oversubscription
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


# --- executors ---------------------------------------------------------------------------------

Job = tuple[Trial, dict[str, Any]]
Runner = Callable[[Sequence[Job]], Iterator[tuple[Trial, dict[str, Any]]]]


def run_fused(
    configs: Sequence[dict[str, Any]], status_paths: Sequence[str]
) -> list[dict[str, Any]]:
    """``run_trial`` for trials that read the same batches, trained together
    (``training.fused.train_fused``): one outcome and status file per trial, as ``run_trial``
    writes them. A trial's ``seconds`` is its share of the group's wall time."""
    from ..training.fused import train_fused

    began = time.perf_counter()
    try:
        results: list[Any] = train_fused([TrainConfig.from_dict(c) for c in configs])
    except Exception as exc:  # noqa: BLE001 - what the group shares failed: every trial fails
        results = [exc] * len(configs)
    seconds = (time.perf_counter() - began) / len(configs)
    outcomes = []
    for result, status_path in zip(results, status_paths, strict=True):
        outcome: dict[str, Any] = (
            {"status": "failed", "error": _one_line(result)}
            if isinstance(result, Exception)
            else {"status": "ok", "error": None}
        )
        outcome |= {
            "seconds": seconds,
            "fused": len(configs),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "finished": _now(),
        }
        _write_json(Path(status_path), outcome)
        outcomes.append(outcome)
    return outcomes


@contextlib.contextmanager
def _local_runner(fuse: bool = True) -> Iterator[Runner]:
    """Trials one after another; with ``fuse``, those that read the same batches together."""
    from ..training.fused import groups

    def run(jobs: Sequence[Job]) -> Iterator[tuple[Trial, dict[str, Any]]]:
        configs = [TrainConfig.from_dict(kwargs["config"]) for _, kwargs in jobs]
        for group in groups(configs) if fuse else [[i] for i in range(len(jobs))]:
            if len(group) == 1:
                trial, kwargs = jobs[group[0]]
                yield trial, run_trial(**kwargs)
                continue
            outcomes = run_fused(
                [jobs[i][1]["config"] for i in group], [jobs[i][1]["status_path"] for i in group]
            )
            for i, outcome in zip(group, outcomes, strict=True):
                yield jobs[i][0], outcome

    yield run


@contextlib.contextmanager
def _dask_runner(config: SweepConfig, report: Callable[[str], None]) -> Iterator[Runner]:
    from distributed import as_completed

    with cluster_client(
        scheduler=config.scheduler,
        workers=config.workers,
        device=config.fixed.get("device", "auto"),
        timeout=config.connect_timeout,
        name="sherl-cache-sweep",
        tasks="trials",
        threads=1,  # one small trial per worker process; no oversubscription
        report=report,
    ) as cluster:
        if not config.scheduler:
            report(cluster.described)
        client = cluster.client

        def run(jobs: Sequence[Job]) -> Iterator[tuple[Trial, dict[str, Any]]]:
            futures = {
                client.submit(
                    run_trial,
                    **kwargs,
                    threads=cluster.threads,
                    key=f"trial-{trial.id}",
                    pure=False,
                    resources={"GPU": 1} if cluster.gpu else None,
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
    runner = _dask_runner(config, report) if distributed else _local_runner(config.fuse)
    with runner as run:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / SPEC_FILE, _spec(config, trials, cache, task.main_metric))
        if done:
            report(f"--resume: {len(done)} of {len(trials)} trials already complete, skipped")
        jobs = []
        for trial in todo:
            status = status_file(out, trial.id)
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
    metrics = RunDir(trial.config.out).read_metrics() or {}
    value = (metrics.get("reported") or metrics.get("best") or {}).get(metric)
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


# Fields whose recorded value legitimately differs between runs of the same trial; the taps
# are compared as resolved, never as spelled.
_UNCOMPARED = ("cache", "out", "overwrite", "tap", "model", "device", "task")


def _partition(trials: Sequence[Trial], cache: Cache) -> tuple[list[Trial], list[Trial]]:
    """Split into complete trials (checked to be the same trial) and ones to (re)run."""
    done, todo = [], []
    family = family_of_cache(cache)
    for trial in trials:
        run_dir = RunDir(trial.config.out)
        if not run_dir.complete:
            todo.append(trial)
            continue
        record = run_dir.read_record()
        if record is None:
            raise RunError(
                f"trial {trial.id} in {run_dir.path} has no readable {CONFIG_FILE}; use another "
                "--out for a different sweep"
            )
        taps = None
        with contextlib.suppress(ConfigError):
            taps = list(run_taps(trial.config, cache))
        resolved = with_family_defaults(trial.config, family)
        pairs = {
            f.name: (getattr(record.config, f.name), getattr(resolved, f.name))
            for f in fields(TrainConfig)
            if f.name not in _UNCOMPARED
        }
        pairs |= {
            "tap": (list(record.taps), taps),
            "cache_key": (record.cache_key, cache.manifest["key"]),
        }
        for key, (recorded, wanted) in pairs.items():
            if recorded != wanted:
                raise RunError(
                    f"trial {trial.id} in {run_dir.path} was run with {key}={recorded!r}, but "
                    f"this sweep asks for {wanted!r}; use another --out for a different sweep"
                )
        done.append(trial)
    return done, todo

"""Commands of stage two: ``train`` one run, ``sweep`` many, ``run`` a pipeline file,
``report`` on a sweep."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from ..config.train import TrainConfig
from .app import app, err, human, reports_errors
from .options import (
    cache_root_option,
    quiet_option,
    scheduler_option,
    settings_options,
    workers_option,
)

# Train options a sweep takes as flags of its own (any other: --set key=value).
SWEEP_FLAGS = ("task", "cache", "model", "epochs", "batch_size", "max_train_examples", "device")


@app.command()
@reports_errors
@settings_options(TrainConfig, optional=("cache", "out"))
def train(
    settings: dict[str, Any],
    cache_root: Path = cache_root_option(),
    quiet: bool = quiet_option(),
) -> None:
    """Train the SHERL fusion, late layers and head from a cache."""
    import datetime as dt

    from ..training.recipe import find_cache
    from ..training.recipe import train as run_train
    from ..training.selection import result_line

    task = settings["task"]
    if settings["cache"] is None:
        settings["cache"] = find_cache(cache_root, task=task, model=settings["model"])
    if settings["out"] is None:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        settings["out"] = Path("runs") / f"{task or 'run'}-{stamp}"
    config = TrainConfig(**settings)
    metrics = run_train(config, report=err, progress=not quiet).metrics
    err(result_line(metrics))
    err(
        f"trainable {metrics['trainable_params']:,} / total {metrics['total_params']:,} params "
        f"({metrics['trainable_percent']:.3f}%), "
        f"peak memory {human(metrics['peak_memory_bytes'])} "
        f"({metrics['memory_measure']}), {1000 * metrics['step_seconds_median']:.1f} ms/step"
    )
    typer.echo(str(config.out))


@app.command()
@reports_errors
@settings_options(TrainConfig, only=SWEEP_FLAGS, optional=SWEEP_FLAGS)
def sweep(
    *,
    out: Path = typer.Option(..., "--out", help="Sweep folder (trials/<id>/, results.parquet)."),
    grid: list[str] = typer.Option(
        [], "--grid", help="Swept train option key=v1,v2 (repeatable; ';' splits comma values)."
    ),
    range_: list[str] = typer.Option(
        [], "--range", help="Option sampled by --random: key=low:high[:log] (repeatable)."
    ),
    random: int | None = typer.Option(
        None, "--random", help="Sample N points from --range/--grid instead of the full grid."
    ),
    random_seed: int = typer.Option(0, "--random-seed", help="Seed of the --random sampling."),
    set_: list[str] = typer.Option(
        [], "--set", help="Fixed train option for every trial: key=value (repeatable)."
    ),
    settings: dict[str, Any],
    cache_root: Path = cache_root_option(),
    workers: int = workers_option(
        0, "Trials on a local dask cluster of N processes (0: one by one here)."
    ),
    scheduler: str | None = scheduler_option(),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the sweep in --out: keep complete trials, rerun the rest."
    ),
    fuse: bool = typer.Option(
        True,
        "--fuse/--no-fuse",
        help="Train trials that read the same batches together (one read per batch; same "
        "results); --no-fuse: one after another.",
    ),
) -> None:
    """Train many trials from one cache (grid or random search); print the ranked results."""
    import dataclasses

    from ..config.values import parse_fixed, parse_grid, parse_range
    from ..experiments.sweep import SweepConfig, format_summary, run_sweep
    from ..training.recipe import find_cache

    task, cache = settings.pop("task"), settings.pop("cache")
    fixed = parse_fixed(set_) | {k: v for k, v in settings.items() if v is not None}
    config = SweepConfig(
        cache=cache or "",
        out=out,
        grid=parse_grid(grid),
        ranges=tuple(parse_range(r) for r in range_),
        random=random,
        random_seed=random_seed,
        fixed=fixed,
        task=task,
        workers=workers,
        scheduler=scheduler,
        resume=resume,
        fuse=fuse,
    )  # validated before looking for a cache: a bad --grid fails first
    if cache is None:
        found = find_cache(cache_root, task=task, model=settings["model"])
        config = dataclasses.replace(config, cache=found)
    result = run_sweep(config, report=err)
    err(f"{result.ran} trial(s) run, {result.skipped} already complete; table {result.table}")
    typer.echo(format_summary(result.rows, result.swept, result.main_metric))
    typer.echo(str(out))


@app.command()
@reports_errors
def report(
    sweep_dir: Path = typer.Argument(..., help="Sweep folder (finished or still running)."),
    out: Path | None = typer.Option(None, "--out", help="Where PNGs go (default <sweep>/report)."),
    top: int = typer.Option(5, "--top", help="Learning curves of this many best trials."),
) -> None:
    """Plot a sweep (metric per swept value, learning curves, memory vs metric); print its table."""
    from ..experiments.report import write_report

    result = write_report(sweep_dir, out=out, top=top)
    for path in result.plots:
        err(f"wrote {path}")
    typer.echo(result.table)
    typer.echo(str(result.folder))


@app.command()
@reports_errors
def run(
    pipeline: Path = typer.Argument(..., help="Pipeline TOML file (see pipelines/)."),
    task: str | None = typer.Option(None, "--task", help="Only this task of a multi-task file."),
    resume: bool = typer.Option(False, "--resume", help="Continue sweeps: keep complete trials."),
    workers: int | None = workers_option(
        None, "Override the file: local dask cluster of N processes."
    ),
    scheduler: str | None = scheduler_option("Override the file: an existing dask scheduler."),
    check: bool = typer.Option(False, "--check", help="Only validate the file; print the plan."),
    quiet: bool = quiet_option(),
) -> None:
    """Run a pipeline file: extract the cache (only if missing), then run its sweep."""
    from ..experiments.pipeline import load_pipeline, run_pipeline
    from ..experiments.sweep import format_summary

    plan = load_pipeline(pipeline)  # the whole file is checked before anything runs
    if check:
        for job in plan.jobs:
            trials = len(job.sweep.trials())
            err(f"{job.task or 'custom'}: {job.model}, {trials} trial(s) -> {job.sweep.out}")
        typer.echo(str(pipeline))
        return
    results = run_pipeline(
        plan,
        resume=resume,
        workers=workers,
        scheduler=scheduler,
        only=task,
        report=err,
        progress=not quiet,
    )
    for result in results:
        typer.echo(f"== {result.out}")
        typer.echo(format_summary(result.rows, result.swept, result.main_metric))
    for result in results:
        typer.echo(str(result.out))

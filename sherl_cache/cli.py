"""The ``sherl-cache`` command line: parses options, calls the library, prints results.

Known failures (``SherlCacheError``) print one line and exit 2; ``--debug`` or
``SHERL_CACHE_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import SherlCacheError

app = typer.Typer(
    name="sherl-cache",
    help="Cache a frozen backbone's hidden states once; train SHERL fusion + late layers from it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_state = {"debug": os.environ.get("SHERL_CACHE_DEBUG", "") not in ("", "0")}


def _err(message: str) -> None:
    typer.echo(message, err=True)


def reports_errors(command):
    """Turn library errors into one line on stderr and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except SherlCacheError as exc:
            if _state["debug"]:
                raise
            _err(f"error: {exc}")
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            _err("interrupted; re-run the same command to resume")
            raise typer.Exit(code=130) from None

    return wrapper


@app.callback()
def main_options(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for known errors."),
) -> None:
    if debug:
        _state["debug"] = True


def _split_list(value: Optional[str]) -> Optional[tuple[str, ...]]:
    if value is None:
        return None
    return tuple(part.strip() for part in value.split(",") if part.strip())


@app.command()
@reports_errors
def extract(
    model: str = typer.Option(..., "--model", help="Hugging Face model id or local folder."),
    task: Optional[str] = typer.Option(
        None, "--task", help="GLUE task name (cola, sst2, mrpc, ...)."
    ),
    data_dir: Optional[Path] = typer.Option(
        None, "--data-dir", help="Folder with GLUE's layout (MRPC/train.tsv, ...)."
    ),
    data: Optional[str] = typer.Option(
        None, "--data", help="Own files: train=a.csv,validation=b.jsonl (csv, tsv, jsonl, parquet)."
    ),
    text_columns: Optional[str] = typer.Option(
        None, "--text-columns", help="One or two text column names, comma separated."
    ),
    label_column: Optional[str] = typer.Option(
        None, "--label-column", help="Label column of own files."
    ),
    layers: str = typer.Option(
        "all", "--layers", help="Hidden-state indices: all | i,j,k | every:N (L-1 is always kept)."
    ),
    dtype: Optional[str] = typer.Option(
        None,
        "--dtype",
        help="float32 | float16 | bfloat16 (default: bfloat16 for T5, else float16).",
    ),
    max_length: int = typer.Option(
        128, "--max-length", help="Tokens per example; longer ones are truncated (counted)."
    ),
    batch_size: int = typer.Option(32, "--batch-size", help="Examples per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    cache: Optional[str] = typer.Option(
        None, "--cache", help="Explicit store path (or fsspec URL)."
    ),
    cache_root: Path = typer.Option(
        Path("cache"), "--cache-root", help="Folder holding caches under derived names."
    ),
    splits: Optional[str] = typer.Option(
        None, "--splits", help="Only these splits, comma separated."
    ),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision of the model."),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Allow model code from the hub (off by default)."
    ),
    chunk_tokens: Optional[int] = typer.Option(None, "--chunk-tokens", hidden=True),
    shard_chunks: Optional[int] = typer.Option(None, "--shard-chunks", hidden=True),
    workers: int | None = typer.Option(
        None, "--workers", help="Extract on a local dask cluster of N processes (one per GPU)."
    ),
    scheduler: str | None = typer.Option(
        None, "--scheduler", help="Extract on an existing dask cluster (tcp://host:8786)."
    ),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Stream a data set through the frozen backbone once and cache per-layer activations."""
    from .data.files import parse_data_option
    from .extraction.extract import ExtractConfig
    from .extraction.extract import extract as run_extract

    config = ExtractConfig(
        model=model,
        task=task,
        data_dir=data_dir,
        data_files=parse_data_option(data) if data else None,
        text_columns=_split_list(text_columns),
        label_column=label_column,
        layers=layers,
        dtype=dtype,
        max_length=max_length,
        batch_size=batch_size,
        device=device,
        cache=cache,
        cache_root=cache_root,
        splits=_split_list(splits),
        revision=revision,
        trust_remote_code=trust_remote_code,
        chunk_tokens=chunk_tokens,
        shard_chunks=shard_chunks,
    )
    if workers is not None or scheduler is not None:
        from .extraction.distributed import extract_distributed

        result = extract_distributed(
            config, workers=workers or 0, scheduler=scheduler, report=_err, progress=not quiet
        )
    else:
        result = run_extract(config, report=_err, progress=not quiet)
    typer.echo(result.path)


@app.command()
@reports_errors
def info(
    path: str = typer.Argument(..., help="Cache path."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest and sizes as JSON."),
) -> None:
    """What is in a cache: model, splits, layers, shapes, dtype, sizes, compression."""
    from .extraction.extract import storage_stats
    from .store.cache import open_cache

    cache = open_cache(path, allow_incomplete=True)
    manifest = cache.manifest
    stats = storage_stats(cache)
    if as_json:
        typer.echo(json.dumps({"manifest": manifest, "stats": stats}, indent=2, default=str))
        return
    model = manifest["model"]
    lines = [
        f"cache      {path}",
        "state      "
        + ("complete" if cache.complete else f"INCOMPLETE (re-run: {manifest.get('command')})"),
        f"model      {model['model_id']} ({model['architecture']}, {model['family']}, "
        f"{model['num_layers']} layers, hidden {model['hidden_size']})",
        f"weights    sha256 {model['weights_sha256'][:16]}…"
        + (f" revision {model['revision']}" if model.get("revision") else ""),
        f"tokenizer  {manifest['tokenizer']['class']} "
        f"(vocab {manifest['tokenizer']['vocab_size']}), "
        f"max length {manifest['max_length']}, truncation {manifest['truncation_side']}",
        f"task       {manifest['task']['name']} ({manifest['task']['problem']}) "
        f"from {manifest['data']['source']}",
        f"dtype      {manifest['dtype']}",
        f"layers     {', '.join(map(str, cache.layers))} "
        f"(index {manifest['guaranteed_layer']} = input of the last layer, always stored "
        "for the late route)",
    ]
    lines.append("splits")
    for split in cache.splits:
        s = stats["per_split"][split]
        meta = manifest["splits"][split]
        ratio = s["bytes_raw"] / s["bytes_stored"] if s["bytes_stored"] else float("nan")
        lines.append(
            f"  {split:<11}{s['rows']:>8} rows {s['tokens']:>10} tokens  "
            f"({len(cache.layers)} x {s['tokens']} x {cache.hidden_size})  "
            f"{_human(s['bytes_stored'])} on disk, {ratio:.2f}x  "
            f"truncated {meta['truncated']}{'' if meta['labelled'] else '  unlabelled'}"
        )
    total_ratio = (
        stats["bytes_raw"] / stats["bytes_stored"] if stats["bytes_stored"] else float("nan")
    )
    lines.append(
        f"total      {_human(stats['bytes_stored'])} on disk, {_human(stats['bytes_raw'])} raw, "
        f"compression {total_ratio:.2f}x"
    )
    typer.echo("\n".join(lines))


@app.command()
@reports_errors
def train(
    task: Optional[str] = typer.Option(
        None, "--task", help="Task the cache was made for (checked)."
    ),
    cache: Optional[str] = typer.Option(
        None, "--cache", help="Cache path; default: find one in --cache-root."
    ),
    model: Optional[str] = typer.Option(
        None, "--model", help="Backbone (finds its cache; source of late weights)."
    ),
    cache_root: Path = typer.Option(
        Path("cache"), "--cache-root", help="Where to look for caches."
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Run folder (default runs/<task>-<time>)."
    ),
    tap: str = typer.Option(
        "default", "--tap", help="Tapped hidden states: default | all | i,j,k | every:N."
    ),
    late_layers: int = typer.Option(
        1, "--late-layers", help="Pre-trained layers after the fusion (k)."
    ),
    late_mode: str = typer.Option("frozen", "--late-mode", help="frozen | full | lora."),
    lora_rank: int = typer.Option(8, "--lora-rank"),
    lora_alpha: float = typer.Option(16.0, "--lora-alpha"),
    reduction: int = typer.Option(8, "--reduction", help="Fusion width d/r."),
    fusion_variant: str = typer.Option("linear", "--fusion-variant", help="linear | gated."),
    fusion_dropout: float = typer.Option(0.1, "--fusion-dropout"),
    head_dropout: float = typer.Option(0.1, "--head-dropout"),
    pool: str = typer.Option("mean", "--pool", help="mean (masked mean of tokens) | first."),
    lr: float = typer.Option(3e-3, "--lr"),
    weight_decay: float = typer.Option(0.0, "--weight-decay"),
    warmup_ratio: float = typer.Option(0.06, "--warmup-ratio"),
    epochs: int = typer.Option(20, "--epochs"),
    batch_size: int = typer.Option(100, "--batch-size"),
    seed: int = typer.Option(0, "--seed"),
    train_split: str = typer.Option("train", "--train-split"),
    eval_split: str = typer.Option("validation", "--eval-split"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    max_train_examples: Optional[int] = typer.Option(None, "--max-train-examples"),
    memory_budget_mb: int = typer.Option(
        4096, "--memory-budget-mb", help="Host memory for cached states; larger splits stream."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in --out."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Train the SHERL fusion, late layers and head from a cache."""
    import datetime as dt

    from .training.recipe import TrainConfig, find_cache
    from .training.recipe import train as run_train

    if cache is None:
        cache = find_cache(cache_root, task=task, model=model)
    if out is None:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / f"{task or 'run'}-{stamp}"
    config = TrainConfig(
        cache=cache,
        out=out,
        task=task,
        tap=tap,
        late_layers=late_layers,
        late_mode=late_mode,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        reduction=reduction,
        fusion_variant=fusion_variant,
        fusion_dropout=fusion_dropout,
        head_dropout=head_dropout,
        pool=pool,
        lr=lr,
        weight_decay=weight_decay,
        warmup_ratio=warmup_ratio,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        train_split=train_split,
        eval_split=eval_split,
        device=device,
        max_train_examples=max_train_examples,
        model=model,
        overwrite=overwrite,
        memory_budget_mb=memory_budget_mb,
    )
    metrics = run_train(config, report=_err, progress=not quiet).metrics
    best = metrics["best"]
    _err(
        "best epoch {epoch}: ".format(**best)
        + ", ".join(f"{k} {best[k]:.4f}" for k in best if k not in ("epoch",))
    )
    _err(
        f"trainable {metrics['trainable_params']:,} / total {metrics['total_params']:,} params "
        f"({metrics['trainable_percent']:.3f}%), "
        f"peak memory {_human(metrics['peak_memory_bytes'])} "
        f"({metrics['memory_measure']}), {1000 * metrics['step_seconds_median']:.1f} ms/step"
    )
    typer.echo(str(out))


@app.command()
@reports_errors
def sweep(
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
    task: str | None = typer.Option(None, "--task", help="Task the cache was made for (checked)."),
    cache: str | None = typer.Option(None, "--cache", help="Cache path; default: find one."),
    model: str | None = typer.Option(None, "--model", help="Backbone (finds its cache)."),
    cache_root: Path = typer.Option(Path("cache"), "--cache-root", help="Where caches are."),
    epochs: int | None = typer.Option(None, "--epochs", help="Epochs of every trial."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Batch size of every trial."),
    max_train_examples: int | None = typer.Option(None, "--max-train-examples"),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda."),
    workers: int = typer.Option(
        0, "--workers", help="Trials on a local dask cluster of N processes (0: one by one here)."
    ),
    scheduler: str | None = typer.Option(
        None, "--scheduler", help="Address of an existing dask scheduler (tcp://host:8786)."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the sweep in --out: keep complete trials, rerun the rest."
    ),
) -> None:
    """Train many trials from one cache (grid or random search); print the ranked results."""
    import dataclasses

    from .config.values import parse_fixed, parse_grid, parse_range
    from .experiments.sweep import SweepConfig, format_summary, run_sweep
    from .training.recipe import find_cache

    fixed = parse_fixed(set_)
    flags = {"epochs": epochs, "batch_size": batch_size, "device": device, "model": model}
    fixed |= {k: v for k, v in flags.items() if v is not None}
    if max_train_examples is not None:
        fixed["max_train_examples"] = max_train_examples
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
    )  # validated before looking for a cache: a bad --grid fails first
    if cache is None:
        found = find_cache(cache_root, task=task, model=model)
        config = dataclasses.replace(config, cache=found)
    result = run_sweep(config, report=_err)
    _err(f"{result.ran} trial(s) run, {result.skipped} already complete; table {result.table}")
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
    from .experiments.report import write_report

    result = write_report(sweep_dir, out=out, top=top)
    for path in result.plots:
        _err(f"wrote {path}")
    typer.echo(result.table)
    typer.echo(str(result.folder))


@app.command()
@reports_errors
def run(
    pipeline: Path = typer.Argument(..., help="Pipeline TOML file (see pipelines/)."),
    task: str | None = typer.Option(None, "--task", help="Only this task of a multi-task file."),
    resume: bool = typer.Option(False, "--resume", help="Continue sweeps: keep complete trials."),
    workers: int | None = typer.Option(
        None, "--workers", help="Override the file: local dask cluster of N processes."
    ),
    scheduler: str | None = typer.Option(
        None, "--scheduler", help="Override the file: an existing dask scheduler."
    ),
    check: bool = typer.Option(False, "--check", help="Only validate the file; print the plan."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Run a pipeline file: extract the cache (only if missing), then run its sweep."""
    from .experiments.pipeline import load_pipeline, run_pipeline
    from .experiments.sweep import format_summary

    plan = load_pipeline(pipeline)  # the whole file is checked before anything runs
    if check:
        for job in plan.jobs:
            trials = len(job.sweep.trials())
            _err(f"{job.task or 'custom'}: {job.model}, {trials} trial(s) -> {job.sweep.out}")
        typer.echo(str(pipeline))
        return
    results = run_pipeline(
        plan,
        resume=resume,
        workers=workers,
        scheduler=scheduler,
        only=task,
        report=_err,
        progress=not quiet,
    )
    for result in results:
        typer.echo(f"== {result.out}")
        typer.echo(format_summary(result.rows, result.swept, result.main_metric))
    for result in results:
        typer.echo(str(result.out))


@app.command()
@reports_errors
def verify(
    path: str = typer.Argument(..., help="Cache path."),
    recompute: int = typer.Option(
        0, "--recompute", help="Also re-run N random examples through the backbone and compare."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for picking the --recompute examples."),
    model: str | None = typer.Option(
        None, "--model", help="Backbone for --recompute (default: the manifest's)."
    ),
    device: str = typer.Option("cpu", "--device", help="--recompute device: auto | cpu | cuda."),
) -> None:
    """Read every chunk back; exit 1 listing corrupt or missing data by split, layer, example."""
    from .store.verify import verify_cache

    if recompute < 0:
        from .errors import ConfigError

        raise ConfigError(f"--recompute must be 0 or more, got {recompute}")
    report = verify_cache(path, recompute=recompute, seed=seed, model=model, device=device)
    typer.echo("\n".join(report.lines()))
    if not report.ok:
        raise typer.Exit(code=1)


@app.command()
@reports_errors
def predict(
    run_dir: Path = typer.Argument(..., help="Run folder written by sherl-cache train."),
    input_file: Path = typer.Option(
        ..., "--input", help="Examples: .csv, .tsv, .jsonl or .parquet with the task's text."
    ),
    output: Path = typer.Option(..., "--output", help="Predictions: .jsonl or .csv."),
    text_columns: str | None = typer.Option(
        None, "--text-columns", help="Text column(s) of --input (default: the task's)."
    ),
    id_column: str | None = typer.Option(
        None, "--id-column", help="Id column of --input (default: the task's, id or idx; else row)."
    ),
    model: str | None = typer.Option(
        None, "--model", help="Backbone (default: the run's; must have the same weights)."
    ),
    batch_size: int = typer.Option(32, "--batch-size", help="Examples per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Predict labels and class scores for new examples with a trained run (no cache needed)."""
    from .inference.predict import check_output_format, load_input, load_run, write_predictions

    check_output_format(output)  # before any model is loaded
    run = load_run(run_dir, model=model, device=device)
    data = load_input(
        input_file, run.task, text_columns=_split_list(text_columns), id_column=id_column
    )
    predictions = run.predict_split(data, batch_size=batch_size, progress=not quiet)
    write_predictions(predictions, output)
    _err(f"predicted {len(predictions)} example(s) of {input_file} with {run_dir}")
    typer.echo(str(output))


@app.command()
@reports_errors
def evaluate(
    run_dir: Path = typer.Argument(..., help="Run folder written by sherl-cache train."),
    split: str = typer.Option("validation", "--split", help="Split to score (test: GLUE file)."),
    data_dir: Path | None = typer.Option(
        None, "--data-dir", help="GLUE folder holding the task's split files."
    ),
    input_file: Path | None = typer.Option(
        None, "--input", help="Labelled examples: .csv, .tsv, .jsonl or .parquet."
    ),
    cache: str | None = typer.Option(
        None, "--cache", help="Score from this cache (must match; default: the run's if it does)."
    ),
    text_columns: str | None = typer.Option(
        None, "--text-columns", help="Text column(s) of --input (default: the task's)."
    ),
    label_column: str | None = typer.Option(
        None, "--label-column", help="Label column of --input (default: the task's or label)."
    ),
    id_column: str | None = typer.Option(None, "--id-column", help="Id column of --input."),
    output: Path | None = typer.Option(
        None, "--output", help="Result file (default <run>/eval-<split>.json or <run>/<TASK>.tsv)."
    ),
    model: str | None = typer.Option(
        None, "--model", help="Backbone (default: the run's; must have the same weights)."
    ),
    batch_size: int = typer.Option(32, "--batch-size", help="Examples per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Score a split with the task's metrics, from a matching cache or computed on the fly."""
    from .inference.predict import evaluate_run, load_run

    run = load_run(run_dir, model=model, device=device)
    result = evaluate_run(
        run,
        split,
        data_dir=data_dir,
        input_file=input_file,
        cache=cache,
        text_columns=_split_list(text_columns),
        label_column=label_column,
        id_column=id_column,
        output=output,
        batch_size=batch_size,
        progress=not quiet,
        report=_err,
    )
    _err(f"{result.examples} example(s) of {split}, {result.source}; wrote {result.written}")
    if result.metrics:
        typer.echo(", ".join(f"{name} {value:.4f}" for name, value in result.metrics.items()))
    typer.echo(str(result.written))


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

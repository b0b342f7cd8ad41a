"""Commands on a trained run: ``predict`` new examples, ``evaluate`` a split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from ..config.predict import PredictConfig
from .app import app, err, reports_errors
from .options import quiet_option, settings_options, split_list, text_columns_option


def run_dir_argument() -> Any:
    return typer.Argument(
        ..., help="Run folder written by sherl-cache train, or a hub repo id (owner/name)."
    )


@app.command()
@reports_errors
@settings_options(PredictConfig)
def predict(
    *,
    run_dir: Path = run_dir_argument(),
    input_file: Path = typer.Option(
        ..., "--input", help="Examples: .csv, .tsv, .jsonl or .parquet with the task's text."
    ),
    output: Path = typer.Option(..., "--output", help="Predictions: .jsonl or .csv."),
    text_columns: str | None = text_columns_option(),
    id_column: str | None = typer.Option(
        None, "--id-column", help="Id column of --input (default: the task's, id or idx; else row)."
    ),
    settings: dict[str, Any],
    quiet: bool = quiet_option(),
) -> None:
    """Predict labels and class scores for new examples with a trained run (no cache needed)."""
    from ..inference.predict import check_output_format, load_input, load_run, write_predictions

    check_output_format(output)  # before any model is loaded
    config = PredictConfig(**settings)
    run = load_run(run_dir, model=config.model, device=config.device)
    data = load_input(
        input_file, run.task, text_columns=split_list(text_columns), id_column=id_column
    )
    predictions = run.predict_split(data, batch_size=config.batch_size, progress=not quiet)
    write_predictions(predictions, output)
    err(f"predicted {len(predictions)} example(s) of {input_file} with {run_dir}")
    typer.echo(str(output))


@app.command()
@reports_errors
@settings_options(PredictConfig)
def evaluate(
    *,
    run_dir: Path = run_dir_argument(),
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
    text_columns: str | None = text_columns_option(),
    label_column: str | None = typer.Option(
        None, "--label-column", help="Label column of --input (default: the task's or label)."
    ),
    id_column: str | None = typer.Option(None, "--id-column", help="Id column of --input."),
    output: Path | None = typer.Option(
        None, "--output", help="Result file (default <run>/eval-<split>.json or <run>/<TASK>.tsv)."
    ),
    settings: dict[str, Any],
    quiet: bool = quiet_option(),
) -> None:
    """Score a split with the task's metrics, from a matching cache or computed on the fly."""
    from ..inference.predict import evaluate_run, load_run

    config = PredictConfig(**settings)
    run = load_run(run_dir, model=config.model, device=config.device)
    result = evaluate_run(
        run,
        split,
        data_dir=data_dir,
        input_file=input_file,
        cache=cache,
        text_columns=split_list(text_columns),
        label_column=label_column,
        id_column=id_column,
        output=output,
        batch_size=config.batch_size,
        progress=not quiet,
        report=err,
    )
    err(f"{result.examples} example(s) of {split}, {result.source}; wrote {result.written}")
    if result.metrics:
        typer.echo(", ".join(f"{name} {value:.4f}" for name, value in result.metrics.items()))
    typer.echo(str(result.written))

"""Commands on caches: ``estimate`` sizes one, ``extract`` writes it, ``info`` describes it,
``verify`` checks it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, get_args

import typer

from ..config.extract import ExtractConfig
from ..config.settings import default_of
from ..config.train import LateMode, TrainConfig
from ..errors import ConfigError
from ..store.verify import RECOMPUTE_DEVICE, verify_cache
from .app import app, err, human, reports_errors
from .options import (
    choices_metavar,
    device_option,
    quiet_option,
    scheduler_option,
    settings_options,
    workers_option,
)


def _data_files(text: str) -> Any:
    from ..data.files import parse_data_option

    return parse_data_option(text)


@app.command()
@reports_errors
@settings_options(ExtractConfig, parsers={"data_files": _data_files})
def extract(
    settings: dict[str, Any],
    workers: int | None = workers_option(
        None, "Extract on a local dask cluster of N processes (one per GPU)."
    ),
    scheduler: str | None = scheduler_option(),
    quiet: bool = quiet_option(),
) -> None:
    """Stream a data set through the frozen backbone once and cache per-layer activations."""
    config = ExtractConfig(**settings)
    if workers is not None or scheduler is not None:
        from ..extraction.distributed import extract_distributed

        result = extract_distributed(
            config, workers=workers or 0, scheduler=scheduler, report=err, progress=not quiet
        )
    else:
        from ..extraction.extract import extract as run_extract

        result = run_extract(config, report=err, progress=not quiet)
    typer.echo(result.path)


@app.command()
@reports_errors
@settings_options(ExtractConfig, parsers={"data_files": _data_files})
def estimate(
    settings: dict[str, Any],
    late_layers: int = typer.Option(
        default_of(TrainConfig, "late_layers"), "--late-layers", help="Stage two's k."
    ),
    late_mode: str = typer.Option(
        default_of(TrainConfig, "late_mode"),
        "--late-mode",
        help="Stage two's late mode.",
        metavar=choices_metavar(get_args(LateMode)),
    ),
    train_batch_size: int = typer.Option(
        default_of(TrainConfig, "batch_size"),
        "--train-batch-size",
        help="Stage two's examples per step (--batch-size is extraction's).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
) -> None:
    """Size of the cache ``extract`` would write (exact token counts, no forward pass), the
    free space where it goes, and stage two's rough peak memory."""
    from ..extraction.estimate import estimate_plan
    from ..extraction.plan import plan_extraction

    config = ExtractConfig(**settings)
    # The same checks (and one-line errors naming the flag) as ``train``.
    TrainConfig(cache="-", out=Path("-"), late_layers=late_layers, late_mode=late_mode)
    if train_batch_size < 1:
        raise ConfigError(f"--train-batch-size must be positive, got {train_batch_size}")
    stage_two = {
        "late_layers": late_layers,
        "late_mode": late_mode,
        "batch_size": train_batch_size,
    }
    result = estimate_plan(plan_extraction(config), stage_two)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        typer.echo("\n".join(result.lines()))


@app.command()
@reports_errors
def info(
    path: str = typer.Argument(..., help="Cache path."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest and sizes as JSON."),
) -> None:
    """What is in a cache: model, splits, layers, shapes, dtype, sizes, compression."""
    from ..store.cache import open_cache
    from ..store.writer import storage_stats

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
        f"dtype      {manifest['dtype']}{_lossy_note(manifest)}",
        f"layers     {', '.join(map(str, cache.layers))} "
        f"(index {manifest['guaranteed_layer']} = input of the last layer, always stored "
        "for the late route)",
    ]
    lines += _route_lines(manifest)
    lines.append("splits")
    for split in cache.splits:
        s = stats["per_split"][split]
        meta = manifest["splits"][split]
        ratio = s["bytes_raw"] / s["bytes_stored"] if s["bytes_stored"] else float("nan")
        lines.append(
            f"  {split:<11}{s['rows']:>8} rows {s['tokens']:>10} tokens  "
            f"({len(cache.layers)} x {s['tokens']} x {cache.hidden_size})  "
            f"{human(s['bytes_stored'])} on disk, {ratio:.2f}x  "
            f"truncated {meta['truncated']}{'' if meta['labelled'] else '  unlabelled'}"
        )
    total_ratio = (
        stats["bytes_raw"] / stats["bytes_stored"] if stats["bytes_stored"] else float("nan")
    )
    lines.append(
        f"total      {human(stats['bytes_stored'])} on disk, {human(stats['bytes_raw'])} raw, "
        f"compression {total_ratio:.2f}x"
    )
    if stats["tokens"]:  # what one more token of data costs: the figure that scales a cache
        lines.append(
            f"per token  {human(stats['bytes_stored'] / stats['tokens'])} on disk "
            f"({len(cache.layers)} states x {cache.hidden_size}, "
            f"{human(stats['bytes_raw'] / stats['tokens'])} raw)"
        )
    typer.echo("\n".join(lines))


def _route_lines(manifest: dict[str, Any]) -> list[str]:
    """How stage two reads the cache; for the seq2seq route its text-to-text format and the
    decoder side it stores."""
    model = manifest["model"]
    route = model.get("route", "encoder")
    t2t = manifest["task"].get("text_to_text")
    if route != "seq2seq" or t2t is None:
        return [f"route      {route}"]
    decoder = model["decoder"]
    example = " ".join(f"{name} <{i}>" for i, name in enumerate(t2t["fields"], 1))
    targets = t2t["targets"]
    shown = ", ".join(targets if len(targets) <= 6 else [*targets[:3], "...", targets[-1]])
    return [
        f"route      seq2seq: encoder taps {', '.join(map(str, model['encoder_taps']))} "
        f"(index {model['num_layers']} = raw output of the last encoder block)",
        f'format     input "{t2t["prefix"]} {example}", targets {shown} '
        f"({len(targets)} candidates)",
        f"decoder    taps {', '.join(map(str, decoder['taps']))} of {decoder['num_layers']} "
        f"layers, per example x {len(targets)} candidates (teacher-forced)",
    ]


def _lossy_note(manifest: dict[str, Any]) -> str:
    lossy = manifest.get("quantization")
    return f" (LOSSY: {lossy['scheme']}; {lossy['error_bound']})" if lossy else ""


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
    device: str = device_option(RECOMPUTE_DEVICE, "--recompute"),
) -> None:
    """Read every chunk back; exit 1 listing corrupt or missing data by split, layer, example."""
    if recompute < 0:
        raise ConfigError(f"--recompute must be 0 or more, got {recompute}")
    report = verify_cache(path, recompute=recompute, seed=seed, model=model, device=device)
    typer.echo("\n".join(report.lines()))
    if not report.ok:
        raise typer.Exit(code=1)

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
    help="Cache a frozen backbone's hidden states once; train SHERL fusion and late layers from it.",
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
    task: Optional[str] = typer.Option(None, "--task", help="GLUE task name (cola, sst2, mrpc, ...)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Folder with GLUE's layout (MRPC/train.tsv, ...)."),
    data: Optional[str] = typer.Option(None, "--data", help="Own files: train=a.csv,validation=b.jsonl (csv, tsv, jsonl, parquet)."),
    text_columns: Optional[str] = typer.Option(None, "--text-columns", help="One or two text column names, comma separated."),
    label_column: Optional[str] = typer.Option(None, "--label-column", help="Label column of own files."),
    layers: str = typer.Option("all", "--layers", help="Hidden-state indices: all | i,j,k | every:N (L-1 is always kept)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | float16 | bfloat16 (default: bfloat16 for T5, else float16)."),
    max_length: int = typer.Option(128, "--max-length", help="Tokens per example; longer ones are truncated (counted)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Examples per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    cache: Optional[str] = typer.Option(None, "--cache", help="Explicit store path (or fsspec URL)."),
    cache_root: Path = typer.Option(Path("cache"), "--cache-root", help="Folder holding caches under derived names."),
    splits: Optional[str] = typer.Option(None, "--splits", help="Only these splits, comma separated."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision of the model."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow model code from the hub (off by default)."),
    chunk_tokens: Optional[int] = typer.Option(None, "--chunk-tokens", hidden=True),
    shard_chunks: Optional[int] = typer.Option(None, "--shard-chunks", hidden=True),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Stream a data set through the frozen backbone once and cache per-layer activations."""
    from .data import parse_data_option
    from .extract import ExtractConfig
    from .extract import extract as run_extract

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
    result = run_extract(config, report=_err, progress=not quiet)
    typer.echo(result.path)


@app.command()
@reports_errors
def info(
    path: str = typer.Argument(..., help="Cache path."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest and sizes as JSON."),
) -> None:
    """What is in a cache: model, splits, layers, shapes, dtype, sizes, compression."""
    from .cache import open_cache
    from .extract import storage_stats

    cache = open_cache(path, allow_incomplete=True)
    manifest = cache.manifest
    stats = storage_stats(cache)
    if as_json:
        typer.echo(json.dumps({"manifest": manifest, "stats": stats}, indent=2, default=str))
        return
    model = manifest["model"]
    lines = [
        f"cache      {path}",
        f"state      {'complete' if cache.complete else 'INCOMPLETE (re-run: ' + str(manifest.get('command')) + ')'}",
        f"model      {model['model_id']} ({model['architecture']}, {model['family']}, "
        f"{model['num_layers']} layers, hidden {model['hidden_size']})",
        f"weights    sha256 {model['weights_sha256'][:16]}…"
        + (f" revision {model['revision']}" if model.get("revision") else ""),
        f"tokenizer  {manifest['tokenizer']['class']} (vocab {manifest['tokenizer']['vocab_size']}), "
        f"max length {manifest['max_length']}, truncation {manifest['truncation_side']}",
        f"task       {manifest['task']['name']} ({manifest['task']['problem']}) from {manifest['data']['source']}",
        f"dtype      {manifest['dtype']}",
        f"layers     {', '.join(map(str, cache.layers))} (index {manifest['guaranteed_layer']} = input "
        "of the last layer, always stored for the late route)",
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
    total_ratio = stats["bytes_raw"] / stats["bytes_stored"] if stats["bytes_stored"] else float("nan")
    lines.append(
        f"total      {_human(stats['bytes_stored'])} on disk, {_human(stats['bytes_raw'])} raw, "
        f"compression {total_ratio:.2f}x"
    )
    typer.echo("\n".join(lines))


@app.command()
@reports_errors
def train(
    task: Optional[str] = typer.Option(None, "--task", help="Task the cache was made for (checked)."),
    cache: Optional[str] = typer.Option(None, "--cache", help="Cache path; default: find one in --cache-root."),
    model: Optional[str] = typer.Option(None, "--model", help="Backbone (finds its cache; source of late weights)."),
    cache_root: Path = typer.Option(Path("cache"), "--cache-root", help="Where to look for caches."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default runs/<task>-<time>)."),
    tap: str = typer.Option("default", "--tap", help="Tapped hidden states: default | all | i,j,k | every:N."),
    late_layers: int = typer.Option(1, "--late-layers", help="Pre-trained layers after the fusion (k)."),
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
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in --out."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Train the SHERL fusion, late layers and head from a cache."""
    import datetime as dt

    from .training import TrainConfig, find_cache
    from .training import train as run_train

    if cache is None:
        cache = find_cache(cache_root, task=task, model=model)
    if out is None:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / f"{task or 'run'}-{stamp}"
    config = TrainConfig(
        cache=cache, out=out, task=task, tap=tap, late_layers=late_layers, late_mode=late_mode,
        lora_rank=lora_rank, lora_alpha=lora_alpha, reduction=reduction,
        fusion_variant=fusion_variant, fusion_dropout=fusion_dropout, head_dropout=head_dropout,
        pool=pool, lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio, epochs=epochs,
        batch_size=batch_size, seed=seed, train_split=train_split, eval_split=eval_split,
        device=device, max_train_examples=max_train_examples, model=model, overwrite=overwrite,
    )
    metrics = run_train(config, report=_err, progress=not quiet).metrics
    best = metrics["best"]
    _err(
        "best epoch {epoch}: ".format(**best)
        + ", ".join(f"{k} {best[k]:.4f}" for k in best if k not in ("epoch",))
    )
    _err(
        f"trainable {metrics['trainable_params']:,} / total {metrics['total_params']:,} params "
        f"({metrics['trainable_percent']:.3f}%), peak memory {_human(metrics['peak_memory_bytes'])} "
        f"({metrics['memory_measure']}), {1000 * metrics['step_seconds_median']:.1f} ms/step"
    )
    typer.echo(str(out))


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

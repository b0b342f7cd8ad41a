"""Stage two's recipe: train the SHERL fusion, the late layers and a head from a cache.

The recipe only wires components: discovery (task, weights), the tap policy, feature sources,
the model, the loop and the run folder. Each is usable alone (the benchmarks and prediction
do), so what ``train`` computes is exactly what they compute.
"""

from __future__ import annotations

import logging
import shlex
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..config.train import TrainConfig
from ..data.tasks import TaskSpec
from ..errors import CacheMismatchError, ConfigError
from ..runtime import resolve_device
from ..store.cache import Cache, open_cache
from .discovery import family_of_cache, find_cache, late_weights_path, task_of, task_record
from .loop import FitResult, fit
from .memory import MemoryMeter
from .model import build_model, parameter_counts, trainable_state, with_family_defaults
from .rundir import ADAPTER_NAME, RunDir, RunRecord
from .selection import Selection, plan_selection, reported_metrics
from .seq2seq import cached_source, is_seq2seq, seq2seq_taps
from .taps import check_stored, resolve_taps
from .tracking import check_tracker, open_tracker

log = logging.getLogger(__name__)

# ``find_cache`` and ``TrainConfig`` are part of what the CLI imports from the recipe.
__all__ = ["TrainConfig", "TrainResult", "find_cache", "train"]


@dataclass
class TrainResult:
    out: Path
    metrics: dict[str, Any]


@dataclass
class Prepared:
    """What every run on one cache and split layout reads, checked before anything trains:
    shared by a lone run (``train``) and a fused group (``training.fused``)."""

    cache: Cache
    task: TaskSpec
    taps: tuple[int, ...]
    split: int
    device: Any
    model_path: str


@dataclass
class Sources:
    """Feature sources cut to the ``--select-on`` protocol (report is None under ``same``)."""

    train: Any
    select: Any
    report: Any
    selection: Selection | None


def run_taps(config: TrainConfig, cache: Cache) -> tuple[int, ...]:
    """The taps ``config`` reads from ``cache``; the paper's T5 route has its own and checks."""
    if is_seq2seq(cache.manifest["model"]):
        return seq2seq_taps(cache, config)
    return resolve_taps(config.tap, cache, config.late_layers)


def prepare(config: TrainConfig) -> Prepared:
    """Open the cache and check it holds what ``config`` trains on (taps, splits, labels)."""
    cache = open_cache(config.cache)
    task = task_of(cache, config.task)
    num_layers = cache.num_layers
    if config.late_layers > num_layers:
        raise ConfigError(
            f"--late-layers must be between 0 and {num_layers}, got {config.late_layers}"
        )
    split = num_layers - config.late_layers
    taps = run_taps(config, cache)
    check_stored(cache, taps, split, task)
    for name in (config.train_split, config.eval_split):
        if name not in cache.splits:
            flag = "--train-split" if name == config.train_split else "--eval-split"
            raise CacheMismatchError(
                f"cache {cache.path} has no split {name!r} ({flag}); it has {cache.splits}"
            )
    if not cache.labelled(config.train_split):
        raise CacheMismatchError(
            f"split {config.train_split!r} of {cache.path} has no labels to train on"
        )
    device = resolve_device(config.device)
    return Prepared(cache, task, taps, split, device, late_weights_path(cache, config.model))


def read_sources(config: TrainConfig, prepared: Prepared) -> Sources:
    """The train, selection and report sources of a run (seeded by ``--selection-seed``)."""
    cache, taps, split = prepared.cache, prepared.taps, prepared.split
    budget = config.memory_budget_mb << 20
    train_source = cached_source(
        cache, config.train_split, taps, split, config.max_train_examples, budget
    )
    if not cache.labelled(config.eval_split):
        return Sources(train_source, None, None, None)
    eval_source = cached_source(cache, config.eval_split, taps, split, memory_budget=budget)
    selection = plan_selection(
        config.selection,
        config.train_split,
        len(train_source),
        config.eval_split,
        len(eval_source),
        config.selection_seed,
    )
    return Sources(*selection.sources(train_source, eval_source), selection)


def train(
    config: TrainConfig, report: Callable[[str], None] = log.info, progress: bool = True
) -> TrainResult:
    """Run stage two from a cache into the run folder ``config.out``."""
    meter = MemoryMeter()
    prepared = prepare(config)
    cache, task, taps = prepared.cache, prepared.task, prepared.taps
    # Recorded resolved, so the run reads the same whatever later versions default to.
    config = with_family_defaults(config, family_of_cache(cache))
    check_tracker(config.report_to)
    run_dir = RunDir(config.out)
    run_dir.prepare(config.overwrite)
    device, model_path = prepared.device, prepared.model_path

    meter.start(device)
    model = build_model(config, cache, task, taps, model_path)
    sources = read_sources(config, prepared)
    train_source, eval_source, selection = sources.train, sources.select, sources.selection
    run_dir.write_record(run_record(config, prepared))
    report(
        f"training {task.name}: {len(train_source)} examples, taps {list(taps)}, "
        f"{config.late_layers} late layer(s) ({config.late_mode}), device {device}"
        + (f"; {selection.sentence()}" if selection is not None else "")
    )
    tracker = open_tracker(config.report_to, run_dir.path)
    try:
        fitted = fit(
            model,
            train_source,
            eval_source,
            task,
            config,
            device,
            report_on=sources.report,
            progress=progress,
            report=report,
            tracker=tracker,
        )
    finally:
        tracker.close()
    peak, measure = meter.peak()

    metrics = finish_run(run_dir, model, fitted, prepared, selection, (peak, measure))
    return TrainResult(config.out, metrics)


def run_record(config: TrainConfig, prepared: Prepared) -> RunRecord:
    """The run's record, with what prediction without the cache needs to compute the same
    features (backbone, tokenizer, lengths, dtype)."""
    cache, manifest = prepared.cache, prepared.cache.manifest
    return RunRecord.resolved(
        config,
        prepared.taps,
        split_index=prepared.split,
        cache_key=manifest["key"],
        model_id=manifest["model"]["model_id"],
        model_path=prepared.model_path,
        backbone=manifest["model"],
        tokenizer=manifest["tokenizer"],
        max_length=manifest["max_length"],
        truncation_side=manifest["truncation_side"],
        dtype=cache.dtype,
        task_spec=task_record(prepared.task),
        sherl_cache_version=__version__,
        command=shlex.join(sys.argv) if sys.argv and "sherl-cache" in sys.argv[0] else None,
    )


def finish_run(
    run_dir: RunDir,
    model: Any,
    fitted: FitResult,
    prepared: Prepared,
    selection: Selection | None,
    peak: tuple[int, str],
    **extra: Any,
) -> dict[str, Any]:
    """Save the chosen epoch's weights and write metrics.json (last: it marks the run
    complete); returns the metrics."""
    run_dir.save_checkpoint(fitted.best_state or trainable_state(model), lora_config(model))
    trainable, total = parameter_counts(model, prepared.model_path, family_of_cache(prepared.cache))
    task = prepared.task
    metrics = {
        "task": task.name,
        "main_metric": task.main_metric,
        **(selection.describe() if selection is not None else {"selected_on": None}),
        "best": fitted.best.to_dict() if fitted.best is not None else {},
        "reported": reported_metrics(fitted, selection),
        "epochs": [e.to_dict() for e in fitted.epochs],
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": round(100 * trainable / total, 4),
        "peak_memory_bytes": int(peak[0]),
        "memory_measure": peak[1],
        "step_seconds_median": statistics.median(fitted.step_seconds),
        "train_seconds": fitted.train_seconds,
        "steps": len(fitted.step_seconds),
        "stopped_early": fitted.stopped_early,
        "device": str(prepared.device),
        **extra,
    }
    run_dir.write_metrics(metrics)
    return metrics


def lora_config(model: Any) -> Any:
    """The ``LoraConfig`` PEFT injected the late route's adapter with; None without LoRA."""
    return getattr(model.late, "peft_config", {}).get(ADAPTER_NAME)

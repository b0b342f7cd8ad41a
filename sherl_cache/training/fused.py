"""Fused trials: several trials that read the same batches trained in lockstep, in one process.

A sweep's trials mostly differ in optimiser and fusion settings, not in what they read. Trials
whose *batches* agree (same cache, splits, taps, split layer, batch size, grad accumulation,
batching and seed, see ``shared_key``) share one epoch order, and each batch is read from the
cache and decoded once for all of them. Each trial keeps its own model, AdamW state, lr,
schedule, early stopping and RNG stream: the global torch RNG is swapped in and out around
each trial's forward and backward, so dropout draws exactly what a lone run draws.

A fused trial therefore takes the same steps, in the same order, on the same batches as the
same trial run alone by ``loop.fit``, and its per-epoch losses, metrics and chosen weights are
identical to it bit for bit, dropout on or off (``tests/test_fused.py``). Only times differ:
a trial's ``step_seconds`` are its own forward and backward plus its share of the shared read.

Why lockstep and not stacked (``torch.func.stack_module_state`` + ``vmap``)? Every trial's
weights differ, so stacking shares no FLOPs; on a CPU the late route's matmuls at a batch of
100 already keep the cores busy, and stacking would forbid per-trial shapes (``--reduction``,
``--late-mode``) and put all trials on one RNG stream (a fused run would then differ from a
lone one under dropout). What lockstep saves is what a trial repeats that does not depend on
its weights: loading and holding the cache (~3 s per MiniLM MRPC trial), reading and decoding
each training batch (~7% of a step), drawing the epoch order. Evaluation still runs per trial
(``loop.evaluate``). On a GPU, where small trials leave the device idle, stacking the fusion
and head is the next step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from ..config.train import TrainConfig
from ..data.tasks import TaskSpec
from ..errors import ConfigError, RunError
from .batching import train_batches
from .discovery import family_of_cache
from .features import FeatureSource
from .loop import (
    SCHEDULES,
    EpochResult,
    FitResult,
    accumulation_groups,
    better,
    evaluate,
    param_groups,
    place,
    restore,
    warmup_steps,
)
from .memory import MemoryMeter
from .model import (
    SherlModel,
    build_model,
    trainable_state,
    with_family_defaults,
)
from .recipe import TrainResult, finish_run, prepare, read_sources, run_record
from .rundir import RunDir
from .tracking import NoTracker, Tracker, check_tracker, open_tracker

log = logging.getLogger(__name__)

__all__ = ["PER_TRIAL", "Member", "fit_fused", "groups", "shared_key", "train_fused"]

# Settings a fused trial may have of its own: they shape its model and optimiser, never the
# batches it reads. Every other field must agree (a new field blocks fusing until listed).
PER_TRIAL = frozenset(
    {
        "out",
        "overwrite",
        "lr",
        "late_lr",
        "weight_decay",
        "warmup_ratio",
        "warmup_steps",
        "lr_scheduler",
        "max_grad_norm",
        "early_stopping",
        "epochs",
        "reduction",
        "fusion_variant",
        "fusion_dropout",
        "fusion_init",
        "head_dropout",
        "tap_dropout",
        "pool",
        "late_mode",
        "late_checkpointing",
        "lora_rank",
        "lora_alpha",
        "report_to",
    }
)


def shared_key(config: TrainConfig) -> tuple[tuple[str, Any], ...]:
    """What must agree for trials to read the same batches (and so be fused)."""
    return tuple(
        (f.name, getattr(config, f.name)) for f in fields(TrainConfig) if f.name not in PER_TRIAL
    )


def groups(configs: Sequence[TrainConfig]) -> list[list[int]]:
    """Indices of ``configs`` grouped by ``shared_key``, in first-seen order."""
    found: dict[tuple[tuple[str, Any], ...], list[int]] = {}
    for index, config in enumerate(configs):
        found.setdefault(shared_key(config), []).append(index)
    return list(found.values())


@dataclass
class Member:
    """One trial of a fused group: its freshly built model and its settings."""

    model: SherlModel
    config: TrainConfig
    report: Callable[[str], None] = log.info
    tracker: Tracker = field(default_factory=NoTracker)


@dataclass
class _Trial:
    """What ``fit`` keeps in local variables, kept per trial."""

    member: Member
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    schedule: Any
    rng: torch.Tensor
    cuda_rng: torch.Tensor | None
    result: FitResult = field(default_factory=FitResult)
    steps: int = 0
    stale: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    group_loss: float = 0.0
    done: bool = False
    error: Exception | None = None

    @property
    def config(self) -> TrainConfig:
        return self.member.config

    @contextlib.contextmanager
    def own_rng(self, device: torch.device) -> Iterator[None]:
        """The global RNG is this trial's stream while inside; its state is kept on exit."""
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, device)
        try:
            yield
        finally:
            self.rng = torch.get_rng_state()
            if self.cuda_rng is not None:
                self.cuda_rng = torch.cuda.get_rng_state(device)


def _start(member: Member, batches_per_epoch: int, device: torch.device) -> _Trial:
    """``fit``'s set-up for one trial: placement, AdamW, schedule, the seeded RNG."""
    from transformers import get_scheduler

    config, model = member.config, member.model
    place(model, device, config.precision)
    optimizer = torch.optim.AdamW(param_groups(model, config), weight_decay=config.weight_decay)
    total = math.ceil(batches_per_epoch / config.grad_accum) * config.epochs
    schedule = get_scheduler(
        SCHEDULES[config.lr_scheduler],
        optimizer,
        num_warmup_steps=warmup_steps(config, total),
        num_training_steps=total,
    )
    torch.manual_seed(config.seed)  # what fit does before its first step
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return _Trial(
        member,
        [p for p in model.parameters() if p.requires_grad],
        optimizer,
        schedule,
        torch.get_rng_state(),
        cuda,
    )


def fit_fused(
    members: Sequence[Member],
    train: FeatureSource,
    evaluation: FeatureSource | None,
    task: TaskSpec,
    device: torch.device,
    *,
    report_on: FeatureSource | None = None,
) -> list[FitResult | Exception]:
    """Train every member as ``loop.fit`` would alone, reading each batch once for all.

    Returns one entry per member: its ``FitResult``, or the exception that stopped it (a trial
    that fails is dropped from the group; the others go on).
    """
    if not members:
        return []
    keys = {shared_key(m.config) for m in members}
    if len(keys) > 1:
        raise ConfigError("fused trials must read the same batches (see fused.shared_key)")
    shared = members[0].config
    batches_per_epoch = math.ceil(len(train) / shared.batch_size)
    trials = [_start(member, batches_per_epoch, device) for member in members]
    order = torch.Generator().manual_seed(shared.seed)
    for epoch in range(1, max(t.config.epochs for t in trials) + 1):
        live = [t for t in trials if not t.done and epoch <= t.config.epochs]
        if not live:
            break
        for trial in live:
            trial.member.model.train()
            trial.losses = []
        batches = train_batches(train, shared.batch_size, order, shared.batching)
        for group in accumulation_groups(batches, shared.grad_accum):
            examples = sum(len(indices) for indices in group)
            for trial in live:
                trial.group_loss = 0.0
            for indices in group:
                t0 = time.perf_counter()
                batch = train.batch(indices, device)  # read and decoded once for every trial
                read = (time.perf_counter() - t0) / len(live)
                for trial in live:
                    _forward_backward(trial, batch, len(indices) / examples, read, device)
            for trial in live:
                _step(trial)
            live = [t for t in live if not t.done]  # a trial that failed leaves the group
            if not live:
                break
        for trial in live:
            _end_epoch(trial, epoch, evaluation, task, device)
    for trial in trials:
        if trial.error is None:
            _finish(trial, report_on, task, device)
    return [t.error if t.error is not None else t.result for t in trials]


def _forward_backward(
    trial: _Trial, batch: Any, share: float, read: float, device: torch.device
) -> None:
    if trial.done:
        return
    t0 = time.perf_counter()
    try:
        with trial.own_rng(device):
            model = trial.member.model
            loss = model.loss(model(batch), batch.labels)
            (loss * share).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - one failing trial must not stop the group
        trial.error, trial.done = exc, True
        trial.member.report(f"trial failed: {type(exc).__name__}: {exc}")
        return
    seconds = time.perf_counter() - t0 + read
    trial.seconds += seconds
    trial.result.step_seconds.append(seconds)
    value = loss.item()
    trial.losses.append(value)
    trial.result.step_losses.append(value)
    trial.group_loss += value * share


def _step(trial: _Trial) -> None:
    if trial.done:
        return
    t0 = time.perf_counter()
    if trial.config.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(trial.params, trial.config.max_grad_norm)
    trial.optimizer.step()
    trial.schedule.step()
    trial.optimizer.zero_grad(set_to_none=True)
    trial.steps += 1
    trial.member.tracker.step(trial.steps, trial.group_loss, trial.schedule.get_last_lr()[0])
    trial.seconds += time.perf_counter() - t0


def _end_epoch(
    trial: _Trial,
    epoch: int,
    evaluation: FeatureSource | None,
    task: TaskSpec,
    device: torch.device,
) -> None:
    """``fit``'s per-epoch bookkeeping: score, record, choose, maybe stop early."""
    t0 = time.perf_counter()
    config, model, result = trial.config, trial.member.model, trial.result
    with trial.own_rng(device):
        metrics = (
            evaluate(model, evaluation, task, device, config.batch_size)[1]
            if evaluation is not None
            else {}
        )
    epoch_result = EpochResult(epoch, float(np.mean(trial.losses)), metrics)
    result.epochs.append(epoch_result)
    trial.member.tracker.epoch(epoch, {"loss": epoch_result.loss, **metrics})
    trial.member.report(
        f"epoch {epoch}: loss {epoch_result.loss:.4f}"
        + "".join(f", {k} {v:.4f}" for k, v in metrics.items())
    )
    if result.best is None or better(epoch_result, result.best, task):
        result.best, result.best_state, trial.stale = epoch_result, trainable_state(model), 0
    else:
        trial.stale += 1
    if config.early_stopping is not None and trial.stale >= config.early_stopping:
        result.stopped_early, trial.done = epoch, True
        trial.member.report(
            f"early stopping after epoch {epoch}: no better {task.main_metric} "
            f"in {trial.stale} epoch(s)"
        )
    trial.seconds += time.perf_counter() - t0


def _finish(
    trial: _Trial, report_on: FeatureSource | None, task: TaskSpec, device: torch.device
) -> None:
    """``fit``'s ending: the trial's time, and the report set scored at the chosen epoch."""
    result, model = trial.result, trial.member.model
    result.train_seconds = trial.seconds
    if report_on is not None:
        if result.best_state is not None:
            restore(model, result.best_state)
        result.reported = evaluate(model, report_on, task, device, trial.config.batch_size)[1]


# --- run folders: recipe.train for a group -------------------------------------------------


def train_fused(
    configs: Sequence[TrainConfig],
    reports: Sequence[Callable[[str], None]] | None = None,
) -> list[TrainResult | Exception]:
    """``recipe.train`` for trials that read the same batches: one run folder per trial, each
    as ``train`` writes it, with the cache opened and its batches read once for all.

    Mirrors ``recipe.train`` step by step (the sweep tests compare the folders); what a group
    shares is checked once, what a trial owns (its folder, model, tracker) per trial, so one
    bad trial fails alone. ``peak_memory_bytes`` is the group's peak.
    """
    if not configs:
        return []
    if len({shared_key(c) for c in configs}) > 1:
        raise ConfigError("fused trials must read the same batches (see fused.shared_key)")
    reports = list(reports) if reports is not None else [log.info] * len(configs)
    meter = MemoryMeter()
    first = configs[0]
    prepared = prepare(first)
    cache, task, taps = prepared.cache, prepared.task, prepared.taps
    device, model_path = prepared.device, prepared.model_path
    meter.start(device)
    sources = read_sources(first, prepared)
    train_source, eval_source, report_source = sources.train, sources.select, sources.report
    selection = sources.selection
    family = family_of_cache(cache)

    outcomes: list[TrainResult | Exception | None] = [None] * len(configs)
    frozen_late: Any = None
    members: list[tuple[int, Member, RunDir]] = []
    for index, config in enumerate(configs):
        report = reports[index]
        try:
            config = with_family_defaults(config, family)
            check_tracker(config.report_to)
            run_dir = RunDir(config.out)
            run_dir.prepare(config.overwrite)
            model = build_model(config, cache, task, taps, model_path)
            if (
                isinstance(model, SherlModel)
                and config.late_mode == "frozen"
                and config.late_layers
            ):
                # frozen late layers are the same weights in every trial: hold them once
                # (for an LLM's late layers the difference is gigabytes per trial)
                if frozen_late is None:
                    frozen_late = model.late
                model.late = frozen_late
            run_dir.write_record(run_record(config, prepared))
            report(
                f"training {task.name}: {len(train_source)} examples, taps {list(taps)}, "
                f"{config.late_layers} late layer(s) ({config.late_mode}), device {device}, "
                f"fused with {len(configs) - 1} other trial(s)"
                + (f"; {selection.sentence()}" if selection is not None else "")
            )
            tracker = open_tracker(config.report_to, run_dir.path)
        except Exception as exc:  # noqa: BLE001 - this trial fails alone
            outcomes[index] = exc
            continue
        members.append((index, Member(model, config, report, tracker), run_dir))
    try:
        fitted = fit_fused(
            [member for _, member, _ in members],
            train_source,
            eval_source,
            task,
            device,
            report_on=report_source,
        )
    finally:
        for _, member, _ in members:
            member.tracker.close()
    peak, measure = meter.peak()
    for (index, member, run_dir), result in zip(members, fitted, strict=True):
        if isinstance(result, Exception):
            outcomes[index] = result
            continue
        metrics = finish_run(
            run_dir,
            member.model,
            result,
            prepared,
            selection,
            (peak, measure),
            fused_trials=len(members),
        )
        outcomes[index] = TrainResult(member.config.out, metrics)
    return [o if o is not None else RunError("trial did not run") for o in outcomes]

"""The training loop: seeded AdamW over any ``FeatureSource``, validation after every epoch,
with the habits of transformers' Trainer (accumulation, clipping, early stopping, schedules).

The loop never knows where features come from, so cached and online training take the same
steps in the same order on the same batches.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..config.train import Batching, TrainConfig
from ..data.metrics import compute_metrics
from ..data.tasks import TaskSpec
from ..logs import bar_disabled
from .batching import eval_batches, restore_order, train_batches
from .features import FeatureSource
from .model import SherlModel, trainable_state
from .tracking import NoTracker, Tracker

log = logging.getLogger(__name__)


@dataclass
class EpochResult:
    epoch: int
    loss: float
    metrics: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """The form metrics.json records an epoch in."""
        return {"epoch": self.epoch, "loss": self.loss, **self.metrics}


@dataclass
class FitResult:
    epochs: list[EpochResult] = field(default_factory=list)
    best: EpochResult | None = None
    best_state: dict[str, Tensor] | None = None
    step_seconds: list[float] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)
    train_seconds: float = 0.0
    stopped_early: int | None = None  # the epoch early stopping ended training after
    reported: dict[str, float] | None = None  # the report set's metrics at the chosen epoch


def evaluate(
    model: SherlModel,
    source: FeatureSource,
    task: TaskSpec,
    device: torch.device,
    batch_size: int,
    batching: Batching = "random",
) -> tuple[np.ndarray, dict[str, float]]:
    """Predictions in split order and their metrics; ``bucketed`` batches by length (less
    padding), equal to split order up to float reassociation."""
    model.eval()
    outputs = []
    batches = eval_batches(source, batch_size, batching)
    with torch.no_grad():
        for indices in batches:
            outputs.append(model(source.batch(indices, device)).float().cpu())
    predictions = restore_order(model.predictions(torch.cat(outputs)).numpy(), batches)
    labels = getattr(source, "labels", None)
    metrics = compute_metrics(task, predictions, labels) if labels is not None else {}
    return predictions, metrics


# --scheduler -> transformers.get_scheduler's name; every schedule starts with the warm-up.
SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def late_bf16(precision: str, device: torch.device) -> bool:
    """Whether the late route runs under bf16 autocast (``--precision``): ``bf16`` on any
    device; ``auto`` on CUDA where the GPU supports bf16 (the CPU stays float32 unless asked:
    its bf16 kernels are slower than float32 on many CPUs)."""
    if precision == "bf16":
        return True
    if precision == "float32" or device.type != "cuda":
        return False
    return torch.cuda.is_bf16_supported()


def store_frozen_bf16(route: nn.Module) -> int:
    """Keep the frozen ``nn.Linear`` weights (and biases) of ``route`` in bfloat16; returns
    how many layers were cast.

    Under bf16 autocast a linear computes with its weight rounded to bfloat16 anyway, so a
    weight that never trains can be stored that way once: the same results (autocast's
    rounding is the same round-to-nearest-even as the cast), half its memory, and no bf16
    copy of it made in each forward pass and kept for backward. Frozen layers are those whose
    weight does not require grad: every linear in ``--late-mode frozen``, PEFT's base layers
    under LoRA (its adapters train and stay float32). Trained weights (``full``) keep float32
    master weights for AdamW; norms and other modules are left alone.
    """
    cast = 0
    for module in route.modules():
        if isinstance(module, nn.Linear) and not module.weight.requires_grad:
            if module.bias is not None and module.bias.requires_grad:
                continue  # a trained bias: keep the layer float32 throughout
            if module.weight.dtype != torch.bfloat16:
                module.to(torch.bfloat16)
                cast += 1
    return cast


def place(model: SherlModel, device: torch.device, precision: str) -> SherlModel:
    """Move the model to ``device`` with the late route's precision set for it.

    A model being trained (some parameter requires grad) under bf16 also stores its late
    route's frozen linears in bfloat16 (``store_frozen_bf16``). A model with nothing to train
    (a loaded run) keeps its weights as they are: ``save_pretrained`` writes them back.
    """
    model.late_bf16 = late_bf16(precision, device)
    training = any(p.requires_grad for p in model.parameters())
    if model.late_bf16 and training:
        store_frozen_bf16(model.late)
    return model.to(device)


def param_groups(model: SherlModel, config: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: the late layers' trained weights at ``--late-lr``, the rest at ``--lr``.

    Pre-trained weights usually want a smaller rate than freshly initialised fusion and head.
    """
    early, late = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (late if name.startswith("late.") else early).append(param)
    groups = [{"params": early, "lr": config.lr}]
    if late:
        groups.append({"params": late, "lr": config.late_lr or config.lr})
    return groups


def warmup_steps(config: TrainConfig, total: int) -> int:
    """``--warmup-steps`` when given, else ``--warmup-ratio`` of the run's steps."""
    return (
        config.warmup_steps if config.warmup_steps is not None else int(config.warmup_ratio * total)
    )


def restore(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Put a ``trainable_state`` back (the chosen epoch's weights)."""
    with torch.no_grad():
        parameters = dict(model.named_parameters())
        for name, value in state.items():
            parameters[name].copy_(value)


def accumulation_groups(batches: list[np.ndarray], accum: int) -> list[list[np.ndarray]]:
    """Consecutive batches whose gradients make one optimiser step (the last may be short)."""
    return [batches[i : i + accum] for i in range(0, len(batches), accum)]


def fit(
    model: SherlModel,
    train: FeatureSource,
    evaluation: FeatureSource | None,
    task: TaskSpec,
    config: TrainConfig,
    device: torch.device,
    *,
    max_steps: int | None = None,
    report_on: FeatureSource | None = None,
    progress: bool = True,
    report: Callable[[str], None] = log.info,
    tracker: Tracker | None = None,
) -> FitResult:
    """Seeded AdamW with a warm-up and ``--scheduler``; ``evaluation`` after every epoch.

    The best epoch is chosen on ``evaluation`` alone. ``report_on``, a disjoint labelled set,
    is scored once, with the chosen epoch's weights (``FitResult.reported``), so what is
    reported never took part in choosing.

    Gradients of ``--grad-accum`` batches add up, each batch's mean loss weighted by its share
    of the group's examples, so a step equals one step on the group as a single batch.
    ``max_steps`` counts optimiser steps.
    """
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    tracker = tracker or NoTracker()
    place(model, device, config.precision)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(model, config), weight_decay=config.weight_decay)
    batches_per_epoch = math.ceil(len(train) / config.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
    total = steps_per_epoch * config.epochs if max_steps is None else max_steps
    schedule = get_scheduler(
        SCHEDULES[config.lr_scheduler],
        optimizer,
        num_warmup_steps=warmup_steps(config, total),
        num_training_steps=total,
    )
    log.debug(
        "%d step(s) of %d batch(es) of %d, schedule %s, late route %s",
        total,
        config.grad_accum,
        config.batch_size,
        config.lr_scheduler,
        "bf16" if model.late_bf16 else "float32",
    )
    order = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    result = FitResult()
    began = time.perf_counter()
    steps, stale = 0, 0
    for epoch in range(1, config.epochs + 1):
        model.train()
        batches = train_batches(train, config.batch_size, order, config.batching)
        losses = []
        bar = tqdm(
            total=steps_per_epoch,
            desc=f"epoch {epoch}/{config.epochs}",
            disable=bar_disabled(progress),
            leave=False,
        )
        for group in accumulation_groups(batches, config.grad_accum):
            examples = sum(len(indices) for indices in group)
            group_loss = 0.0
            for indices in group:
                t0 = time.perf_counter()
                batch = train.batch(indices, device)
                loss = model.loss(model(batch), batch.labels)
                (loss * (len(indices) / examples)).backward()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                result.step_seconds.append(time.perf_counter() - t0)
                value = loss.item()
                losses.append(value)
                result.step_losses.append(value)
                group_loss += value * len(indices) / examples
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
            tracker.step(steps, group_loss, schedule.get_last_lr()[0])
            bar.set_postfix(loss=f"{group_loss:.4f}")
            bar.update()
            if max_steps is not None and steps >= max_steps:
                break
        bar.close()
        metrics = (
            evaluate(model, evaluation, task, device, config.batch_size)[1]
            if evaluation is not None
            else {}
        )
        epoch_result = EpochResult(epoch, float(np.mean(losses)), metrics)
        result.epochs.append(epoch_result)
        tracker.epoch(epoch, {"loss": epoch_result.loss, **metrics})
        report(
            f"epoch {epoch}: loss {epoch_result.loss:.4f}"
            + "".join(f", {k} {v:.4f}" for k, v in metrics.items())
        )
        if result.best is None or better(epoch_result, result.best, task):
            result.best, result.best_state, stale = epoch_result, trainable_state(model), 0
        else:
            stale += 1
        if max_steps is not None and steps >= max_steps:
            break
        if config.early_stopping is not None and stale >= config.early_stopping:
            result.stopped_early = epoch
            report(
                f"early stopping after epoch {epoch}: no better {task.main_metric} "
                f"in {stale} epoch(s)"
            )
            break
    result.train_seconds = time.perf_counter() - began
    if report_on is not None:
        if result.best_state is not None:
            restore(model, result.best_state)
        result.reported = evaluate(model, report_on, task, device, config.batch_size)[1]
    return result


def better(candidate: EpochResult, best: EpochResult, task: TaskSpec) -> bool:
    """Whether an epoch beats the best so far: by the main metric on the selection data, by
    the training loss where there is none."""
    if task.main_metric in candidate.metrics and task.main_metric in best.metrics:
        return candidate.metrics[task.main_metric] > best.metrics[task.main_metric]
    return candidate.loss < best.loss

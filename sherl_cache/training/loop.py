"""The training loop: seeded AdamW over any ``FeatureSource``, validation after every epoch.

The loop never knows where features come from, so cached and online training take the same
steps in the same order on the same batches.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..config.train import TrainConfig
from ..data.metrics import compute_metrics
from ..data.tasks import TaskSpec
from .features import FeatureSource
from .model import SherlModel, trainable_state


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


def evaluate(
    model: SherlModel, source: FeatureSource, task: TaskSpec, device: torch.device, batch_size: int
) -> tuple[np.ndarray, dict[str, float]]:
    model.eval()
    outputs = []
    with torch.no_grad():
        for start in range(0, len(source), batch_size):
            indices = np.arange(start, min(start + batch_size, len(source)))
            outputs.append(model(source.batch(indices, device)).float().cpu())
    predictions = torch.cat(outputs).numpy()
    labels = getattr(source, "labels", None)
    metrics = compute_metrics(task, predictions, labels) if labels is not None else {}
    return predictions, metrics


def fit(
    model: SherlModel,
    train: FeatureSource,
    evaluation: FeatureSource | None,
    task: TaskSpec,
    config: TrainConfig,
    device: torch.device,
    *,
    max_steps: int | None = None,
    progress: bool = True,
    report: Callable[[str], None] = lambda _: None,
) -> FitResult:
    """Seeded AdamW with linear warm-up and decay; validation after every epoch."""
    from tqdm.auto import tqdm

    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total = steps_per_epoch * config.epochs if max_steps is None else max_steps
    warmup = int(config.warmup_ratio * total)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            (step + 1) / warmup
            if step < warmup
            else max(0.0, (total - step) / max(1, total - warmup))
        ),
    )
    order = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    result = FitResult()
    began = time.perf_counter()
    steps = 0
    for epoch in range(1, config.epochs + 1):
        model.train()
        permutation = (
            train.order(order)
            if hasattr(train, "order")
            else torch.randperm(len(train), generator=order).numpy()
        )
        losses = []
        bar = tqdm(
            total=steps_per_epoch,
            desc=f"epoch {epoch}/{config.epochs}",
            disable=not progress,
            leave=False,
        )
        for start in range(0, len(train), config.batch_size):
            t0 = time.perf_counter()
            batch = train.batch(permutation[start : start + config.batch_size], device)
            loss = model.loss(model(batch), batch.labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            result.step_seconds.append(time.perf_counter() - t0)
            value = loss.item()
            losses.append(value)
            result.step_losses.append(value)
            bar.set_postfix(loss=f"{value:.4f}")
            bar.update()
            steps += 1
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
        report(
            f"epoch {epoch}: loss {epoch_result.loss:.4f}"
            + "".join(f", {k} {v:.4f}" for k, v in metrics.items())
        )
        if result.best is None or _better(epoch_result, result.best, task):
            result.best, result.best_state = epoch_result, trainable_state(model)
        if max_steps is not None and steps >= max_steps:
            break
    result.train_seconds = time.perf_counter() - began
    return result


def _better(candidate: EpochResult, best: EpochResult, task: TaskSpec) -> bool:
    if task.main_metric in candidate.metrics and task.main_metric in best.metrics:
        return candidate.metrics[task.main_metric] > best.metrics[task.main_metric]
    return candidate.loss < best.loss

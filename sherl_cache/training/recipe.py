"""Stage two: train the SHERL fusion, the late layers and a head from cached hidden states.

The model sees features through a ``FeatureSource``: ``CachedFeatures`` reads the cache,
``OnlineFeatures`` runs the frozen backbone in the loop. Both give the same tensors for the
same examples, so the cache changes what training costs, never what it computes; the
equivalence test pins that.
"""

from __future__ import annotations

import copy
import json
import math
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from .. import __version__
from ..backbone.hub import backbone_parameter_count, verified_model_dir
from ..backbone.late import build_late_route
from ..config.train import DEFAULT_MEMORY_BUDGET, Pool, TrainConfig
from ..data.metrics import compute_metrics
from ..data.tasks import Problem, TaskSpec, custom_task, get_task
from ..errors import CacheMismatchError, ConfigError, RunError
from ..families import Family, LateRoute, get_family
from ..layers import parse_layer_spec
from ..runtime import STORAGE_DTYPES, from_storage, resolve_device
from ..store.cache import Cache, open_cache
from ..training.fusion import FusionConfig, MTSAFusion
from ..training.memory import MemoryMeter


def family_of_cache(cache: Cache) -> Family:
    return get_family(cache.manifest["model"]["family"])


def resolve_taps(spec: str, cache: Cache, k: int) -> tuple[int, ...]:
    """The hidden-state indices the fusion reads: ``default`` is the family's choice for the
    depth, limited to what the cache stores; explicit forms must lie at or below the split."""
    num_layers, stored = cache.num_layers, cache.layers
    split = num_layers - k
    if spec == "default":
        defaults = family_of_cache(cache).default_taps(num_layers, k)
        taps = tuple(t for t in defaults if t in stored or t == split)
    else:
        taps = parse_layer_spec(spec, num_layers, flag="--tap")
    above = [t for t in taps if t > split]
    if above:
        raise ConfigError(
            f"tapped layer(s) {above} are above the split (--tap): with --late-layers {k} the "
            f"fusion reads hidden-state indices 0..{split}"
        )
    return taps


# --- features ---------------------------------------------------------------------------


@dataclass
class Batch:
    taps: list[Tensor]  # each (B, T, d) float32
    last: Tensor  # (B, T, d): the frozen input of the first late layer
    mask: Tensor  # (B, T) 1/0
    labels: Tensor | None


class FeatureSource(Protocol):
    def __len__(self) -> int: ...

    def batch(self, indices: np.ndarray, device: torch.device) -> Batch: ...


class CachedFeatures:
    """Padded batches of one split's cached states, read within a host-memory budget.

    A split that fits the budget is read once and kept. A larger one is cut into *windows* of
    consecutive examples that each fit; an epoch visits the windows in random order and the
    examples of each window in random order (a block shuffle), so only one window is held at a
    time and reads stay sequential. Host memory thus stays bounded whatever the data size.
    """

    def __init__(
        self,
        cache: Cache,
        split: str,
        taps: Sequence[int],
        last: int,
        limit: int | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
    ):
        self.taps, self.last = list(taps), last
        self.dtype = cache.dtype
        offsets = cache.offsets(split)
        count = len(offsets) - 1 if limit is None else min(limit, len(offsets) - 1)
        self.offsets = offsets[: count + 1]
        self.labels = cache.labels(split)[:count] if cache.labelled(split) else None
        self._arrays = {layer: cache.layer_array(split, layer) for layer in {*self.taps, last}}
        row_bytes = len(self._arrays) * cache.hidden_size * STORAGE_DTYPES[self.dtype].itemsize
        self.windows = _windows(self.offsets, max(1, memory_budget // row_bytes))
        self._window: int | None = None
        self._held: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def order(self, generator: torch.Generator) -> np.ndarray:
        """The epoch's example order: a plain permutation when one window holds the split."""
        if len(self.windows) == 1:
            return torch.randperm(len(self), generator=generator).numpy()
        visits = torch.randperm(len(self.windows), generator=generator).tolist()
        return np.concatenate(
            [
                first + torch.randperm(end - first, generator=generator).numpy()
                for first, end in (self.windows[w] for w in visits)
            ]
        )

    def _hold(self, window: int) -> None:
        if window != self._window:
            self._held = {}  # drop the previous window before reading the next
            first, end = self.windows[window]
            span = slice(int(self.offsets[first]), int(self.offsets[end]))
            self._held = {layer: array[span] for layer, array in self._arrays.items()}
            self._window = window

    def batch(self, indices: np.ndarray, device: torch.device) -> Batch:
        starts = self.offsets[indices]
        lengths = self.offsets[indices + 1] - starts
        width = int(lengths.max())
        positions = np.arange(width)[None, :]
        mask = positions < lengths[:, None]
        window_of = np.searchsorted([first for first, _ in self.windows], indices, "right") - 1
        self._hold(int(window_of[0]))
        inside = window_of == self._window
        base = int(self.offsets[self.windows[self._window][0]])
        gather = np.where(mask, starts[:, None] - base + positions, starts[:, None] - base)
        keep = torch.from_numpy(mask[..., None]).to(device)

        def states(layer: int) -> Tensor:
            rows = self._held[layer][np.where(inside[:, None], gather, 0)]
            for row in np.flatnonzero(~inside):  # a batch crossing a window edge: read directly
                start, n = int(starts[row]), int(lengths[row])
                rows[row, :n] = self._arrays[layer][start : start + n]
            return torch.from_numpy(from_storage(rows, self.dtype)).to(device) * keep

        return Batch(
            taps=[states(layer) for layer in self.taps],
            last=states(self.last),
            mask=torch.from_numpy(mask.astype(np.int64)).to(device),
            labels=None
            if self.labels is None
            else torch.from_numpy(self.labels[indices]).to(device),
        )


def _windows(offsets: np.ndarray, max_tokens: int) -> list[tuple[int, int]]:
    """Consecutive example ranges of at most ``max_tokens`` tokens (at least one example)."""
    windows, first = [], 0
    count = len(offsets) - 1
    while first < count:
        end = int(np.searchsorted(offsets, offsets[first] + max_tokens, "right")) - 1
        end = min(max(end, first + 1), count)
        windows.append((first, end))
        first = end
    return windows or [(0, 0)]


class OnlineFeatures:
    """The same features computed by the frozen backbone in the loop (eval mode, no grad).

    The reference that ``CachedFeatures`` must match, and the baseline of the benchmarks.
    """

    def __init__(
        self,
        backbone: nn.Module,
        cache: Cache,
        split: str,
        taps: Sequence[int],
        last: int,
        limit: int | None = None,
    ):
        self.backbone, self.cache, self.split = backbone, cache, split
        self.taps, self.last = list(taps), last
        count = (
            cache.num_examples(split) if limit is None else min(limit, cache.num_examples(split))
        )
        self.count = count
        self.labels = cache.labels(split)[:count] if cache.labelled(split) else None
        self.ids = [cache.input_ids(split, i) for i in range(count)]
        types = [cache.token_type_ids(split, i) for i in range(count)]
        self.types = None if types and types[0] is None else types
        self.accepts_types = family_of_cache(cache).uses_token_type_ids

    def __len__(self) -> int:
        return self.count

    def batch(self, indices: np.ndarray, device: torch.device) -> Batch:
        width = max(len(self.ids[i]) for i in indices)
        ids = torch.zeros((len(indices), width), dtype=torch.long)
        types = torch.zeros_like(ids)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(indices):
            n = len(self.ids[i])
            ids[row, :n] = torch.from_numpy(self.ids[i].astype(np.int64))
            mask[row, :n] = 1
            if self.types is not None:
                types[row, :n] = torch.from_numpy(self.types[i].astype(np.int64))
        inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        if self.types is not None and self.accepts_types:
            inputs["token_type_ids"] = types.to(device)
        with torch.no_grad():
            states = self.backbone(**inputs, output_hidden_states=True).hidden_states
        keep = mask.to(device)[..., None].float()
        return Batch(
            taps=[states[layer].float() * keep for layer in self.taps],
            last=states[self.last].float() * keep,
            mask=mask.to(device),
            labels=None
            if self.labels is None
            else torch.from_numpy(self.labels[indices]).to(device),
        )


# --- the model ------------------------------------------------------------------------------


class SherlModel(nn.Module):
    """MTSA fusion -> last k pre-trained layers -> pooled task head."""

    def __init__(
        self, fusion: MTSAFusion, late: LateRoute, task: TaskSpec, pool: Pool, head_dropout: float
    ):
        super().__init__()
        self.fusion, self.late, self.pool = fusion, late, pool
        hidden = fusion.config.hidden_size
        outputs = 1 if task.problem == Problem.REGRESSION else task.num_labels
        self.head = nn.Sequential(nn.Dropout(head_dropout), nn.Linear(hidden, outputs))
        self.regression = task.problem == Problem.REGRESSION

    def forward(self, batch: Batch) -> Tensor:
        fused = self.fusion(batch.taps, batch.last, batch.mask)
        states = self.late(fused, batch.mask)
        if self.pool == "first":
            pooled = states[:, 0]
        else:  # masked mean: every real token counts, padding never does
            weights = batch.mask[..., None].to(states.dtype)
            pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        logits = self.head(pooled)
        return logits.squeeze(-1) if self.regression else logits

    def loss(self, outputs: Tensor, labels: Tensor) -> Tensor:
        if self.regression:
            return nn.functional.mse_loss(outputs, labels.float())
        return nn.functional.cross_entropy(outputs, labels.long())


def build_model(
    config: TrainConfig,
    backbone: Cache | Mapping[str, Any],
    task: TaskSpec,
    taps: Sequence[int],
    model_path: str,
) -> SherlModel:
    """A freshly initialised SherlModel (seeded), late layers read from ``model_path``.

    ``backbone`` is the backbone identity as a cache manifest records it (``model``: family,
    hidden_size, ...); a Cache stands for its own. Taking the identity rather than a cache lets
    a run be rebuilt for prediction from its config.json alone.
    """
    identity = backbone.manifest["model"] if isinstance(backbone, Cache) else backbone
    torch.manual_seed(config.seed)
    fusion = MTSAFusion(
        FusionConfig(
            hidden_size=int(identity["hidden_size"]),
            num_taps=len(taps),
            reduction=config.reduction,
            dropout=config.fusion_dropout,
            variant=config.fusion_variant,
        )
    )
    late = build_late_route(model_path, config.late_layers)
    model = SherlModel(fusion, late, task, config.pool, config.head_dropout)
    model.late.requires_grad_(config.late_mode == "full")
    if config.late_mode == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        present = {name.rsplit(".", 1)[-1] for name, _ in model.late.named_modules()}
        wanted = get_family(identity["family"]).lora_targets
        targets = [t for t in wanted if t in present]
        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, target_modules=targets)
        inject_adapter_in_model(lora, model.late)
        for name, param in model.late.named_parameters():
            param.requires_grad_("lora_" in name)
    return model


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


# --- the loop ---------------------------------------------------------------------------------


@dataclass
class EpochResult:
    epoch: int
    loss: float
    metrics: dict[str, float]


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


# --- the command ------------------------------------------------------------------------------


@dataclass
class TrainResult:
    out: Path
    metrics: dict[str, Any]


def task_record(task: TaskSpec) -> dict[str, Any]:
    """What a run stores about its task: enough to rebuild it, and to check class order."""
    return {
        "name": task.name,
        "problem": task.problem.value,
        "label_names": list(task.label_names) if task.label_names else None,
        "text_columns": list(task.text_columns),
        "label_column": task.label_column,
        "id_column": task.id_column,
    }


def task_from_record(recorded: Mapping[str, Any], where: str) -> TaskSpec:
    """The TaskSpec a cache manifest or run config recorded; GLUE tasks come from the registry.

    A GLUE task whose recorded class order differs from the registry's is refused: output i of
    the head would silently be given another label's name.
    """
    try:
        task = get_task(recorded["name"])
    except ConfigError:
        return custom_task(
            recorded["text_columns"],
            recorded.get("label_column"),
            tuple(recorded["label_names"]) if recorded.get("label_names") else None,
            Problem(recorded["problem"]),
        )
    names = recorded.get("label_names")
    if names is not None and tuple(names) != task.label_names:
        raise CacheMismatchError(
            f"{where} labels task {task.name} as {names}, this sherl-cache as "
            f"{list(task.label_names or ())} (field task.label_names); use the sherl-cache "
            "version that made it"
        )
    return task


def task_of(cache: Cache, requested: str | None) -> TaskSpec:
    recorded = cache.manifest["task"]
    if requested is not None:
        wanted = get_task(requested)
        if wanted.name != recorded["name"]:
            raise CacheMismatchError(
                f"cache {cache.path} was made for task {recorded['name']!r}, not {wanted.name!r} "
                f"(--task); make one with: sherl-cache extract --model "
                f"{cache.manifest['model']['model_id']} --task {wanted.name}"
            )
    return task_from_record(recorded, f"cache {cache.path}")


def find_cache(cache_root: Path, task: str | None, model: str | None) -> str:
    """The complete cache under ``cache_root`` for this task and model, else how to make one."""
    if task is None or model is None:
        raise ConfigError("pass --cache PATH, or --task and --model to find a matching cache")
    wanted = get_task(task).name
    matches = []
    for candidate in sorted(Path(cache_root).glob("*")) if Path(cache_root).is_dir() else []:
        try:
            found = open_cache(str(candidate), allow_incomplete=True)
        except Exception:  # noqa: BLE001 - anything unreadable is simply not a match
            continue
        recorded = found.manifest.get("model", {})
        if found.manifest.get("task", {}).get("name") == wanted and model in (
            recorded.get("model_id"),
            found.manifest.get("model_path"),
        ):
            matches.append(found)
    complete = [c for c in matches if c.complete]
    if complete:
        return max(complete, key=lambda c: c.manifest.get("completed", "")).path
    command = f"sherl-cache extract --model {model} --task {wanted} --cache-root {cache_root}"
    if matches:
        resume = matches[-1].manifest.get("command") or command  # its own flags, not defaults
        raise CacheMismatchError(
            f"the cache for {wanted} and {model} is incomplete; finish it with: {resume}"
        )
    raise CacheMismatchError(
        f"no cache for task {wanted} and model {model} in {cache_root}; make one with: {command}"
    )


def late_weights_path(cache: Cache, override: str | None) -> str:
    """The checkpoint the late layers come from, checked against the cache's weights hash."""
    recorded = cache.manifest["model"]
    candidates = (
        [override] if override else [recorded["model_id"], cache.manifest.get("model_path")]
    )
    return verified_model_dir(recorded, candidates, f"cache {cache.path}", "model.weights_sha256")


def prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise RunError(
                f"--out {out} already holds a run; choose another --out or pass --overwrite"
            )
        for name in ("metrics.json", "config.json", "trainable.safetensors"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def train(
    config: TrainConfig, report: Callable[[str], None] = lambda _: None, progress: bool = True
) -> TrainResult:
    """Run stage two from a cache; writes config.json, trainable.safetensors, metrics.json."""
    meter = MemoryMeter()
    cache = open_cache(config.cache)
    task = task_of(cache, config.task)
    num_layers = cache.num_layers
    if config.late_layers > num_layers:
        raise ConfigError(
            f"--late-layers must be between 1 and {num_layers}, got {config.late_layers}"
        )
    split = num_layers - config.late_layers
    taps = resolve_taps(config.tap, cache, config.late_layers)
    missing = sorted((set(taps) | {split}) - set(cache.layers))
    if missing:
        raise CacheMismatchError(
            f"cache {cache.path} does not store hidden-state indices {missing} needed by "
            f"--tap/--late-layers (field layers: cache has {cache.layers}); make one with: "
            f"sherl-cache extract --model {cache.manifest['model']['model_id']} --task "
            f"{task.name} --layers {','.join(map(str, sorted(set(cache.layers) | set(missing))))}"
        )
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
    prepare_out(config.out, config.overwrite)
    device = resolve_device(config.device)
    model_path = late_weights_path(cache, config.model)

    meter.start(device)
    model = build_model(config, cache, task, taps, model_path)
    budget = config.memory_budget_mb << 20
    train_source = CachedFeatures(
        cache, config.train_split, taps, split, config.max_train_examples, budget
    )
    eval_source = (
        CachedFeatures(cache, config.eval_split, taps, split, memory_budget=budget)
        if cache.labelled(config.eval_split)
        else None
    )
    resolved = config.to_dict() | {
        "tap": list(taps),
        "split_index": split,
        "task": task.name,
        "cache_key": cache.manifest["key"],
        "model_id": cache.manifest["model"]["model_id"],
        "model_path": model_path,
        # What prediction without the cache needs to compute the same features.
        "backbone": cache.manifest["model"],
        "tokenizer": cache.manifest["tokenizer"],
        "max_length": cache.manifest["max_length"],
        "truncation_side": cache.manifest["truncation_side"],
        "dtype": cache.dtype,
        "task_spec": task_record(task),
        "sherl_cache_version": __version__,
        "command": shlex.join(sys.argv) if sys.argv and "sherl-cache" in sys.argv[0] else None,
    }
    (config.out / "config.json").write_text(json.dumps(resolved, indent=2))
    report(
        f"training {task.name}: {len(train_source)} examples, taps {list(taps)}, "
        f"{config.late_layers} late layer(s) ({config.late_mode}), device {device}"
    )
    fitted = fit(
        model, train_source, eval_source, task, config, device, progress=progress, report=report
    )
    peak, measure = meter.peak()

    save_file(
        fitted.best_state or trainable_state(model), str(config.out / "trainable.safetensors")
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    added = sum(
        p.numel() for n, p in model.named_parameters() if not n.startswith("late.") or "lora_" in n
    )
    total = backbone_parameter_count(model_path, family_of_cache(cache)) + added
    metrics = {
        "task": task.name,
        "main_metric": task.main_metric,
        "best": _epoch_dict(fitted.best),
        "epochs": [_epoch_dict(e) for e in fitted.epochs],
        "trainable_params": int(trainable),
        "total_params": int(total),
        "trainable_percent": round(100 * trainable / total, 4),
        "peak_memory_bytes": int(peak),
        "memory_measure": measure,
        "step_seconds_median": statistics.median(fitted.step_seconds),
        "train_seconds": fitted.train_seconds,
        "steps": len(fitted.step_seconds),
        "device": str(device),
    }
    # Written last: its presence marks the run complete.
    (config.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return TrainResult(config.out, metrics)


def _epoch_dict(epoch: EpochResult | None) -> dict[str, Any]:
    if epoch is None:
        return {}
    return {"epoch": epoch.epoch, "loss": epoch.loss, **epoch.metrics}


def copy_config(config: TrainConfig, **changes: Any) -> TrainConfig:
    data = copy.deepcopy(config.to_dict()) | changes
    return TrainConfig.from_dict(data)

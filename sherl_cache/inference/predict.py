"""Use a trained run on new data: predict labels and scores, or score a split (no cache needed).

A run folder holds only the trainable tensors; everything else is rebuilt from its config.json.
The frozen backbone named there (model_id, else model_path, refused unless its weights hash is
the recorded one) runs only up to the split (``run_lower_layers``); the fusion, the late layers
and the head then run with the checkpoint loaded. Text goes through extraction's own
``tokenize_split`` with the recorded tokenizer and max_length, so the token positions match.

Precision: hidden states are rounded to the run's cache dtype (float16 / bfloat16) before the
fusion. The model was trained on rounded states, and rounding makes predictions computed on
the fly equal the ones training's evaluation made from the cache, up to float32 noise plus the
rare element that float32 noise moves across a rounding boundary (one step of the storage
dtype). For float32 caches nothing is rounded. ``tests/test_predict.py`` pins both.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..backbone.frozen import load_backbone, run_lower_layers
from ..backbone.hub import verified_model_dir
from ..data.files import SplitData, load_files, load_glue
from ..data.metrics import compute_metrics
from ..data.tasks import HUB_LABEL_COLUMN, Problem, TaskSpec
from ..errors import (
    CacheMismatchError,
    ConfigError,
    DataError,
    ModelLoadError,
    RunError,
    SherlCacheError,
)
from ..families import get_family
from ..runtime import DEVICES, resolve_device, round_to_storage
from ..store.cache import Cache, open_cache
from ..training.recipe import (
    Batch,
    CachedFeatures,
    SherlModel,
    TrainConfig,
    build_model,
    evaluate,
    task_from_record,
)

__all__ = [
    "CHECKPOINT",
    "EvalResult",
    "Prediction",
    "Predictions",
    "Run",
    "evaluate_run",
    "load_input",
    "load_run",
    "write_predictions",
]

CHECKPOINT = "trainable.safetensors"
OUTPUT_FORMATS = (".jsonl", ".csv")
_INPUT_FORMATS = (".csv", ".tsv", ".jsonl", ".json", ".ndjson", ".parquet")
# Recorded in config.json by ``train``; together they fix the features a run was trained on.
_IDENTITY_FIELDS = ("backbone", "tokenizer", "max_length", "truncation_side", "dtype", "task_spec")
# GLUE submission file name per (task, split); the server wants class names for these tasks,
# class indices (0/1) for the other classification tasks and the score for STS-B.
_SUBMISSION_FILES = {
    ("cola", "test"): "CoLA",
    ("sst2", "test"): "SST-2",
    ("mrpc", "test"): "MRPC",
    ("qqp", "test"): "QQP",
    ("stsb", "test"): "STS-B",
    ("mnli", "test"): "MNLI-m",
    ("mnli", "test_mismatched"): "MNLI-mm",
    ("qnli", "test"): "QNLI",
    ("rte", "test"): "RTE",
    ("wnli", "test"): "WNLI",
}
_SUBMIT_LABEL_NAMES = {"mnli", "qnli", "rte"}


# --- predictions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """One example's prediction: the label name (the value for regression) and class scores."""

    id: str
    label: str | float
    scores: dict[str, float] | None  # softmax probability per label name; None for regression


@dataclass
class Predictions:
    """Predictions of many examples as arrays, in input order."""

    ids: list[str]
    outputs: np.ndarray  # the head's output: (N, C) logits, or (N,) regression values
    task: TaskSpec

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def scores(self) -> np.ndarray | None:
        """Softmax probabilities (N, C); None for regression."""
        if self.task.problem is Problem.REGRESSION:
            return None
        shifted = self.outputs - self.outputs.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        return exp / exp.sum(axis=1, keepdims=True)

    @property
    def classes(self) -> np.ndarray | None:
        """Predicted class indices (N,); None for regression."""
        if self.task.problem is Problem.REGRESSION:
            return None
        return self.outputs.argmax(axis=1)

    @property
    def labels(self) -> list[str | float]:
        if self.classes is None:
            return [float(v) for v in self.outputs]
        names = self.task.label_names or ()
        return [names[i] for i in self.classes]

    def records(self) -> list[Prediction]:
        scores, names = self.scores, self.task.label_names or ()
        return [
            Prediction(
                id=self.ids[row],
                label=label,
                scores=None
                if scores is None
                else {name: float(p) for name, p in zip(names, scores[row], strict=True)},
            )
            for row, label in enumerate(self.labels)
        ]


def write_predictions(predictions: Predictions, output: Path) -> None:
    """One row per example (id, label, a score per class): JSON Lines or CSV by extension."""
    output = Path(output)
    check_output_format(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    records = predictions.records()
    if output.suffix.lower() == ".jsonl":
        with output.open("w", encoding="utf-8") as handle:
            for record in records:
                row: dict[str, Any] = {"id": record.id, "label": record.label}
                if record.scores is not None:
                    row["scores"] = record.scores
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        return
    names = list(predictions.task.label_names or ())
    with output.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "label", *(f"score_{name}" for name in names)])
        for record in records:
            scores = [record.scores[name] for name in names] if record.scores else []
            writer.writerow([record.id, record.label, *scores])


def check_output_format(output: Path) -> None:
    if Path(output).suffix.lower() not in OUTPUT_FORMATS:
        raise ConfigError(
            f"cannot tell the format of {output} (--output): use a .jsonl or .csv file"
        )


# --- features computed on the fly ----------------------------------------------------------


class TextFeatures:
    """A ``FeatureSource`` over tokenised text: the frozen backbone runs up to the split."""

    def __init__(
        self,
        backbone: nn.Module,
        input_ids: Sequence[Sequence[int]],
        token_type_ids: Sequence[Sequence[int]] | None,
        taps: Sequence[int],
        last: int,
        dtype: str,
        pad_id: int,
    ) -> None:
        self.backbone, self.taps, self.last, self.dtype = backbone, list(taps), last, dtype
        self.input_ids, self.pad_id = input_ids, pad_id
        self.token_type_ids = token_type_ids

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, indices: np.ndarray, device: torch.device) -> Batch:
        width = max(len(self.input_ids[i]) for i in indices)
        ids = torch.full((len(indices), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        types = None if self.token_type_ids is None else torch.zeros_like(ids)
        for row, i in enumerate(indices):
            n = len(self.input_ids[i])
            ids[row, :n] = torch.as_tensor(self.input_ids[i])
            mask[row, :n] = 1
            if types is not None:
                types[row, :n] = torch.as_tensor(self.token_type_ids[i])
        mask = mask.to(device)
        with torch.no_grad():
            states = run_lower_layers(
                self.backbone,
                ids.to(device),
                mask,
                self.last,
                None if types is None else types.to(device),
            )
        keep = mask[..., None].float()

        def feature(layer: int) -> Tensor:
            return round_to_storage(states[layer].float(), self.dtype) * keep

        return Batch([feature(t) for t in self.taps], feature(self.last), mask, None)


# --- the run -------------------------------------------------------------------------------


class Run:
    """A trained run ready to predict: its model on ``device``, the backbone loaded on demand."""

    def __init__(
        self,
        path: Path,
        record: dict[str, Any],
        metrics: dict[str, Any],
        config: TrainConfig,
        task: TaskSpec,
        model: SherlModel,
        model_path: str,
        device: torch.device,
    ) -> None:
        self.path, self.record, self.metrics = path, record, metrics
        self.config, self.task = config, task
        self.taps: tuple[int, ...] = tuple(record["tap"])
        self.split_index: int = int(record["split_index"])
        self.dtype: str = record["dtype"]
        self.max_length: int = int(record["max_length"])
        self.model, self.model_path, self.device = model, model_path, device
        self.family = get_family(record["backbone"]["family"])
        self._backbone: tuple[nn.Module, Any] | None = None

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, task={self.task.name!r}, model={self.model_path!r})"

    # The full backbone is only needed for text input; scoring a cache never loads it.
    def backbone(self) -> tuple[nn.Module, Any]:
        """The frozen backbone on the run's device and its tokenizer (checked against the run)."""
        if self._backbone is None:
            from ..backbone.frozen import tokenizer_identity

            net, tokenizer, info = load_backbone(self.model_path, device=self.device)
            found = tokenizer_identity(tokenizer, Path(info.path), self.family)
            for name, recorded in self.record["tokenizer"].items():
                if name != "name" and found.get(name) != recorded:
                    raise ModelLoadError(
                        f"the tokenizer of {self.model_path} is not the one run {self.path} was "
                        f"trained with (field tokenizer.{name}: run has {recorded!r}, model has "
                        f"{found.get(name)!r}); pass --model with the original"
                    )
            self._backbone = (net, tokenizer)
        return self._backbone

    def predict(
        self,
        examples: Sequence[str | Sequence[str]],
        *,
        ids: Sequence[str] | None = None,
        batch_size: int = 32,
        progress: bool = False,
    ) -> list[Prediction]:
        """Label and class scores of each example: a text, or a (text, text) pair for pair
        tasks; ids default to row numbers."""
        width = len(self.task.text_columns)
        columns: tuple[list[str], ...] = tuple([] for _ in range(width))
        for row, example in enumerate(examples):
            texts = (example,) if isinstance(example, str) else tuple(example)
            if len(texts) != width or not all(isinstance(t, str) for t in texts):
                raise DataError(
                    f"example {row} is {example!r}: task {self.task.name} takes {width} text(s) "
                    f"per example ({', '.join(self.task.text_columns)})"
                )
            for column, text in zip(columns, texts, strict=True):
                column.append(text)
        names = [str(i) for i in range(len(columns[0]))] if ids is None else list(ids)
        split = SplitData("predict", columns, None, names)
        return self.predict_split(split, batch_size=batch_size, progress=progress).records()

    def predict_split(
        self, split: SplitData, *, batch_size: int = 32, progress: bool = False
    ) -> Predictions:
        """Predictions for every row of ``split``, computed from its text."""
        from ..extraction.extract import tokenize_split

        _check_batch_size(batch_size)
        if len(split.texts) != len(self.task.text_columns):
            raise DataError(
                f"{split.name} has {len(split.texts)} text column(s); task {self.task.name} "
                f"takes {len(self.task.text_columns)} (--text-columns)"
            )
        if len(split) == 0:
            return Predictions([], self._empty_outputs(), self.task)
        backbone, tokenizer = self.backbone()
        tokens = tokenize_split(self.family, tokenizer, split, self.max_length)
        pad_id = self.family.pad_id(tokenizer)
        source = TextFeatures(
            backbone,
            tokens.input_ids,
            tokens.token_type_ids,
            self.taps,
            self.split_index,
            self.dtype,
            pad_id,
        )
        # Longest first, like extraction: batches of similar length waste little on padding.
        order = np.argsort([-len(ids) for ids in tokens.input_ids], kind="stable")
        outputs = self._run(source, order, batch_size, progress, f"predict {split.name}")
        return Predictions(list(split.ids), outputs, self.task)

    def predict_cached(self, cache: Cache, split: str, *, batch_size: int = 32) -> Predictions:
        """Predictions from a cache's stored states: exactly training's evaluation."""
        _check_batch_size(batch_size)
        problem = cache_mismatch(self, cache, split)
        if problem is not None:
            raise CacheMismatchError(
                f"cache {cache.path} does not fit run {self.path} for split {split!r} ({problem})"
            )
        source = CachedFeatures(cache, split, self.taps, self.split_index)
        outputs, _ = evaluate(self.model, source, self.task, self.device, batch_size)
        ids = [str(i) for i in range(len(source))]
        return Predictions(ids, outputs, self.task)

    def _run(
        self, source: TextFeatures, order: np.ndarray, batch_size: int, progress: bool, desc: str
    ) -> np.ndarray:
        from tqdm.auto import tqdm

        outputs = np.empty((len(source), *self._empty_outputs().shape[1:]), dtype=np.float32)
        self.model.eval()
        bar = tqdm(total=len(source), desc=desc, unit="ex", disable=not progress, leave=False)
        with torch.no_grad(), bar:
            for start in range(0, len(source), batch_size):
                indices = order[start : start + batch_size]
                values = self.model(source.batch(indices, self.device))
                outputs[indices] = values.float().cpu().numpy()
                bar.update(len(indices))
        return outputs

    def _empty_outputs(self) -> np.ndarray:
        if self.task.problem is Problem.REGRESSION:
            return np.zeros((0,), dtype=np.float32)
        return np.zeros((0, self.task.num_labels), dtype=np.float32)


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {batch_size}")


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RunError(f"{file} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise RunError(f"{file} is not a JSON object")
    return data


def _read_run(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """config.json and metrics.json of a finished run, or the one line saying what is wrong."""
    if not path.is_dir():
        raise RunError(f"no run folder {path}")
    if not (path / "config.json").is_file():
        raise RunError(f"{path} has no config.json: not a run folder written by sherl-cache train")
    if not (path / CHECKPOINT).is_file():
        raise RunError(f"run {path} has no checkpoint {CHECKPOINT}; re-run sherl-cache train")
    if not (path / "metrics.json").is_file():
        raise RunError(
            f"run {path} is incomplete (no metrics.json: training did not finish); "
            "re-run sherl-cache train"
        )
    return _read_json(path / "config.json"), _read_json(path / "metrics.json")


def _with_identity(record: dict[str, Any], path: Path) -> dict[str, Any]:
    """Runs trained before config.json recorded the feature identity: take it from their cache."""
    if all(name in record for name in _IDENTITY_FIELDS):
        return record
    try:
        manifest = open_cache(str(record.get("cache"))).manifest
    except SherlCacheError:
        raise RunError(
            f"run {path} predates prediction support (config.json lacks field backbone) and "
            f"its cache {record.get('cache')} is gone; re-run sherl-cache train"
        ) from None
    return {
        "backbone": manifest["model"],
        "tokenizer": manifest["tokenizer"],
        "max_length": manifest["max_length"],
        "truncation_side": manifest["truncation_side"],
        "dtype": manifest["dtype"],
        "task_spec": manifest["task"],
    } | record


def load_run(path: str | Path, *, model: str | None = None, device: str = "auto") -> Run:
    """Open a finished run for prediction; ``model`` overrides where the backbone is read.

    The backbone must be the one the run's cache was made with (same weights sha256); the
    checkpoint must hold exactly the tensors the run's configuration trains.
    """
    path = Path(path)
    if device not in DEVICES:
        raise ConfigError(f"unknown --device {device!r}: choose auto, cpu, cuda")
    record, metrics = _read_run(path)
    record = _with_identity(record, path)
    try:
        config = TrainConfig.from_dict(record)
        taps = tuple(int(t) for t in record["tap"])
    except (KeyError, TypeError, ValueError) as exc:
        raise RunError(f"{path / 'config.json'} is not a sherl-cache run config ({exc})") from None
    task = task_from_record(record["task_spec"], f"run {path}")
    backbone = record["backbone"]
    candidates = [model] if model else [backbone.get("model_id"), record.get("model_path")]
    model_path = verified_model_dir(backbone, candidates, f"run {path}", "backbone.weights_sha256")
    with torch.random.fork_rng(devices=[]):  # build_model seeds; keep the caller's RNG
        net = build_model(config, backbone, task, taps, model_path)
    _load_checkpoint(net, path / CHECKPOINT)
    resolved = resolve_device(device)
    net.requires_grad_(False).eval().to(resolved)
    return Run(path, record, metrics, config, task, net, model_path, resolved)


def _load_checkpoint(model: SherlModel, file: Path) -> None:
    """Load the trainable tensors; any tensor missing, extra or misshapen is refused."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise RunError(f"cannot read checkpoint {file} ({exc})") from None
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(trainable - set(state))
    unexpected = sorted(set(state) - set(model.state_dict()))
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise RunError(
            f"checkpoint {file} does not fit the run's config.json ({len(missing)} tensor(s) "
            f"missing, {len(unexpected)} unexpected, e.g. {example})"
        )
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise RunError(f"checkpoint {file} does not fit the run's config.json ({first})") from None


# --- input files ---------------------------------------------------------------------------


def _columns_of(path: Path) -> list[str] | None:
    """A data file's column names from its first record; None when that is not cheap to read
    (``load_files`` then reports what is wrong with the file)."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            with path.open(encoding="utf-8-sig", newline="") as handle:
                if suffix == ".csv":
                    return next(csv.reader(handle), None)
                return handle.readline().rstrip("\r\n").split("\t")
        if suffix in (".jsonl", ".json", ".ndjson"):
            with path.open(encoding="utf-8") as handle:
                first = json.loads(handle.readline())
            return list(first) if isinstance(first, dict) else None
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
    except (OSError, ValueError, csv.Error):
        return None
    return None


def load_input(
    path: str | Path,
    task: TaskSpec,
    *,
    text_columns: Sequence[str] | None = None,
    label_column: str | None = None,
    id_column: str | None = None,
    labelled: bool = False,
) -> SplitData:
    """One file of examples for ``task`` (CSV, TSV, JSON Lines or Parquet).

    Text columns default to the task's, spelled as in GLUE's files or as on the hub (MRPC:
    ``#1 String``/``#2 String`` or ``sentence1``/``sentence2``). Ids come from ``id_column``,
    else the task's id column, ``id`` or ``idx`` where the file has one, else row numbers. With
    ``labelled`` the labels are read from ``label_column``, else the task's label column or
    ``label``, when present.
    """
    path = Path(path)
    if path.suffix.lower() not in _INPUT_FORMATS:
        raise ConfigError(
            f"cannot tell the format of {path} (--input): use a .csv, .tsv, .jsonl or .parquet file"
        )
    if not path.is_file():
        raise DataError(f"{path} not found (--input)")
    columns = _columns_of(path)
    if text_columns is None:
        options = [task.text_columns] + ([task.hub_text_columns] if task.hub_text_columns else [])
        found = [c for c in options if columns is not None and set(c) <= set(columns)]
        if columns is not None and not found:
            spelled = " or ".join(", ".join(map(repr, c)) for c in options)
            raise DataError(
                f"{path} lacks the text column(s) of task {task.name}: {spelled} "
                f"(--text-columns); its columns are: {', '.join(map(repr, columns))}"
            )
        text_columns = found[0] if found else task.text_columns
    elif len(text_columns) != len(task.text_columns):
        raise ConfigError(
            f"--text-columns names {len(text_columns)} column(s); task {task.name} takes "
            f"{len(task.text_columns)}"
        )

    def present(*names: str | None) -> str | None:
        return next((n for n in names if n and columns is not None and n in columns), None)

    if id_column is None:
        id_column = present(task.id_column, "id", "idx")
    if labelled and label_column is None:
        label_column = present(task.label_column, HUB_LABEL_COLUMN)
    # Loaded as "test": the one split name load_files lets go without labels.
    dataset = load_files(
        {"test": path},
        tuple(text_columns),
        label_column if labelled else None,
        task=task,
        id_column=id_column,
    )
    return replace(dataset.splits["test"], name=path.name)  # names the progress bar


# --- evaluation ----------------------------------------------------------------------------


@dataclass
class EvalResult:
    split: str
    source: str  # "cache PATH" or "computed on the fly"
    examples: int
    metrics: dict[str, float]  # empty when the split has no labels
    written: Path  # eval-<split>.json, or the GLUE submission file for unlabelled test splits


def cache_mismatch(run: Run, cache: Cache, split: str, data: SplitData | None = None) -> str | None:
    """Why ``cache`` cannot stand in for computing ``split`` on the fly; None if it can.

    Matching means the same features: same backbone weights, tokenizer, max_length and storage
    dtype, the tapped layers stored, and (when the data is at hand) the same rows.
    """
    manifest = cache.manifest
    if not cache.complete:
        return "the cache is incomplete"
    record = run.record
    pairs = [
        (
            "model.weights_sha256",
            manifest["model"]["weights_sha256"],
            record["backbone"]["weights_sha256"],
        ),
        (
            "tokenizer.files_sha256",
            manifest["tokenizer"].get("files_sha256"),
            record["tokenizer"].get("files_sha256"),
        ),
        ("max_length", manifest.get("max_length"), record["max_length"]),
        ("truncation_side", manifest.get("truncation_side"), record["truncation_side"]),
        ("dtype", manifest.get("dtype"), record["dtype"]),
        ("task.name", manifest["task"]["name"], run.task.name),
    ]
    for name, found, wanted in pairs:
        if found != wanted:
            return f"field {name}: cache has {found!r}, run needs {wanted!r}"
    needed = sorted((set(run.taps) | {run.split_index}) - set(cache.layers))
    if needed:
        return f"field layers: cache lacks hidden-state indices {needed}"
    if split not in cache.splits:
        return f"it has no split {split!r}, only {cache.splits}"
    if data is not None:
        recorded = manifest["data"]["splits"].get(split, {}).get("fingerprint")
        if recorded != data.fingerprint():
            return f"field data.splits.{split}.fingerprint: the cache holds other rows"
    return None


def evaluate_run(
    run: Run,
    split: str = "validation",
    *,
    data_dir: Path | None = None,
    input_file: Path | None = None,
    cache: str | None = None,
    text_columns: Sequence[str] | None = None,
    label_column: str | None = None,
    id_column: str | None = None,
    output: Path | None = None,
    batch_size: int = 32,
    progress: bool = True,
    report: Callable[[str], None] = lambda _: None,
) -> EvalResult:
    """Score ``split`` with the run's task metrics, from a matching cache or on the fly.

    Data comes from ``input_file``, else the GLUE folder ``data_dir``. ``cache`` names a cache
    that must match (else an error); without it the run's own training cache is used when it
    matches. A split without labels of a GLUE test set gives GLUE's submission file
    (``<TASK>.tsv``: ``index`` and ``prediction`` columns) instead of metrics.
    """
    if input_file is not None and data_dir is not None:
        raise ConfigError("pass --data-dir or --input, not both")
    data = None
    if input_file is not None:
        data = load_input(
            input_file,
            run.task,
            text_columns=text_columns,
            label_column=label_column,
            id_column=id_column,
            labelled=True,
        )
    elif data_dir is not None:
        if not run.task.is_glue:
            raise ConfigError(
                f"run {run.path} is not of a GLUE task: pass --input FILE, not --data-dir"
            )
        data = load_glue(run.task, Path(data_dir), [split]).splits[split]
    found = _choose_cache(run, split, data, cache, report)
    if data is None and found is None:
        raise ConfigError("nothing to evaluate: pass --data-dir (GLUE folder), --input or --cache")
    if found is not None:
        predictions = run.predict_cached(found, split, batch_size=batch_size)
        labels = found.labels(split) if found.labelled(split) else None
        if data is not None:
            predictions.ids = list(data.ids)
        source = f"cache {found.path}"
    else:
        assert data is not None
        predictions = run.predict_split(data, batch_size=batch_size, progress=progress)
        labels = data.labels
        source = "computed on the fly"
    if labels is None:
        written = _write_submission(run, split, predictions, output)
        return EvalResult(split, source, len(predictions), {}, written)
    metrics = compute_metrics(run.task, predictions.outputs, labels)
    written = Path(output) if output is not None else run.path / f"eval-{split}.json"
    summary = {
        "run": str(run.path),
        "task": run.task.name,
        "split": split,
        "examples": len(predictions),
        "source": source,
        "data_fingerprint": None if data is None else data.fingerprint(),
        "main_metric": run.task.main_metric,
        "metrics": metrics,
    }
    written.parent.mkdir(parents=True, exist_ok=True)
    written.write_text(json.dumps(summary, indent=2))
    return EvalResult(split, source, len(predictions), metrics, written)


def _choose_cache(
    run: Run,
    split: str,
    data: SplitData | None,
    explicit: str | None,
    report: Callable[[str], None],
) -> Cache | None:
    """The explicit cache (which must match) or the run's training cache if it matches."""
    if explicit is not None:
        cache = open_cache(explicit)
        problem = cache_mismatch(run, cache, split, data)
        if problem is not None:
            raise CacheMismatchError(
                f"cache {explicit} (--cache) does not fit run {run.path} for split {split!r} "
                f"({problem}); leave out --cache to compute on the fly"
            )
        return cache
    recorded = run.record.get("cache")
    try:
        cache = open_cache(str(recorded)) if recorded else None
    except SherlCacheError:
        cache = None
    if cache is None:
        return None
    problem = cache_mismatch(run, cache, split, data)
    if problem is not None:
        report(f"not using cache {cache.path} ({problem}); computing on the fly")
        return None
    return cache


def _write_submission(run: Run, split: str, predictions: Predictions, output: Path | None) -> Path:
    name = _SUBMISSION_FILES.get((run.task.name, split))
    if name is None:
        raise DataError(
            f"split {split!r} has no labels to score (--label-column); for its predictions "
            "use sherl-cache predict"
        )
    if run.task.problem is Problem.REGRESSION:
        values = [f"{v:.3f}" for v in predictions.outputs]
    elif run.task.name in _SUBMIT_LABEL_NAMES:
        values = [str(label) for label in predictions.labels]
    else:
        values = [str(int(c)) for c in predictions.classes]  # type: ignore[union-attr]
    written = Path(output) if output is not None else run.path / f"{name}.tsv"
    written.parent.mkdir(parents=True, exist_ok=True)
    rows = "".join(f"{i}\t{v}\n" for i, v in zip(predictions.ids, values, strict=True))
    written.write_text("index\tprediction\n" + rows, encoding="utf-8")
    return written

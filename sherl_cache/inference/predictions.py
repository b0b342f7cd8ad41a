"""Predictions of a run and the files they come from and go to.

``Predictions`` holds the head's outputs for many examples in input order; labels and class
scores are derived from them, so a file written from them and the metrics computed from them
always agree. ``load_input`` reads the user's examples the way ``load_files`` reads a task's.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..data.files import SplitData, load_files
from ..data.tasks import HUB_LABEL_COLUMN, Problem, TaskSpec
from ..errors import ConfigError, DataError

OUTPUT_FORMATS = (".jsonl", ".csv")
INPUT_FORMATS = (".csv", ".tsv", ".jsonl", ".json", ".ndjson", ".parquet")


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
    if path.suffix.lower() not in INPUT_FORMATS:
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

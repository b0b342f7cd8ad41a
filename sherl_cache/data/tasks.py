"""The one place that knows GLUE: file names, column names, label vocabularies and metrics.

Loaders, trainers and reports read everything task-specific from a :class:`TaskSpec`, so adding
or fixing a task never means touching code elsewhere. Column names are the ones GLUE's own TSV
files use (not the Hugging Face ones), because the local GLUE folder is the primary source; the
hub names are kept alongside for the fallback loader.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType

from ..errors import ConfigError

# Metric names as the GLUE leaderboard spells them; metrics.py implements exactly these.
METRIC_NAMES = ("accuracy", "f1", "matthews", "pearson", "spearman")

# Every nyu-mll/glue config uses these two names; only the text columns differ per task.
HUB_LABEL_COLUMN = "label"
HUB_ID_COLUMN = "idx"


class Problem(str, Enum):
    """Whether the head predicts a class index or a real number."""

    CLASSIFICATION = "classification"
    REGRESSION = "regression"


def _frozen(mapping: Mapping[str, object] | None) -> Mapping:
    return MappingProxyType(dict(mapping or {}))


# STS-B as text: scores rounded to bins of 0.2, each written with one decimal ("0.0".."5.0").
STSB_STEP = 0.2
STSB_BINS = tuple(f"{i * STSB_STEP:.1f}" for i in range(26))


@dataclass(frozen=True)
class TextToText:
    """A task as the reference T5 code writes it: ``<prefix> <field> <text> <field> <text>``
    as the input, a short label text as the target.

    The seq2seq route scores every target in ``targets`` (rank classification), so class ``i``
    is ``targets[i]``; the GLUE label words are the class indices as digits, in the registry's
    (the hub's) class order. A regression task's targets are score bins: ``bin_of`` maps a
    score to its bin, ``values`` maps bins back to numbers for Pearson/Spearman.
    """

    prefix: str
    fields: tuple[str, ...]  # one field name per text column, written before its text
    targets: tuple[str, ...]

    def source(self, texts: Sequence[str]) -> str:
        """The input text of one example: the prefix, then each field name and its text."""
        parts = [self.prefix]
        for name, text in zip(self.fields, texts, strict=True):
            parts += [name, text]
        return " ".join(parts)

    @property
    def values(self) -> tuple[float, ...]:
        """The number each target stands for (regression bins)."""
        return tuple(float(t) for t in self.targets)

    def bin_of(self, score: float) -> int:
        """The target index of a regression score: the nearest bin, clamped to the range."""
        index = int(round(float(score) / STSB_STEP))
        return min(max(index, 0), len(self.targets) - 1)


@dataclass(frozen=True)
class TaskSpec:
    """Everything needed to read, train and score one task.

    ``label_names`` fixes the class index of each label by position, in the Hugging Face
    ``nyu-mll/glue`` order, so a model trained from local TSVs and one trained from the hub
    agree on what output 0 means. Mapping fields are read-only and excluded from hashing so a
    spec can still be used as a dict key.
    """

    name: str
    glue_folder: str | None
    text_columns: tuple[str, ...]
    label_column: str | None
    label_names: tuple[str, ...] | None
    problem: Problem
    metrics: tuple[str, ...]
    main_metric: str
    # split name -> file name inside ``glue_folder``; order is the canonical split order.
    split_files: Mapping[str, str] = field(default_factory=dict, hash=False)
    # Column holding a row id where a file has one (GLUE test files all do).
    id_column: str | None = None
    # split name -> column names, for files that have no header row (CoLA train/dev).
    headerless_columns: Mapping[str, tuple[str, ...]] = field(default_factory=dict, hash=False)
    # (repository, config) for ``datasets.load_dataset``; None for user-defined tasks.
    hub: tuple[str, str] | None = None
    hub_text_columns: tuple[str, ...] | None = None
    # split name -> hub split name, only where they differ (MNLI's matched sets).
    hub_splits: Mapping[str, str] = field(default_factory=dict, hash=False)
    # The text-to-text form the seq2seq route (T5 as the paper runs it) trains on.
    text_to_text: TextToText | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        for name in ("split_files", "headerless_columns", "hub_splits"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))
        # Catch registry typos at import time rather than at the end of a long training run.
        if not 1 <= len(self.text_columns) <= 2:
            raise ValueError(f"{self.name}: needs 1 or 2 text columns, got {self.text_columns}")
        if self.problem is Problem.CLASSIFICATION and (
            self.label_names is None or len(self.label_names) < 2
        ):
            raise ValueError(f"{self.name}: classification needs at least two label names")
        if self.problem is Problem.REGRESSION and self.label_names is not None:
            raise ValueError(f"{self.name}: regression tasks have no label names")
        unknown = set(self.metrics) - set(METRIC_NAMES)
        if unknown or self.main_metric not in self.metrics:
            raise ValueError(f"{self.name}: bad metrics {self.metrics} / {self.main_metric}")
        t2t = self.text_to_text
        if t2t is not None and len(t2t.fields) != len(self.text_columns):
            # A registry task read from files with another number of text columns: the
            # format names the registry's fields, so it no longer applies.
            object.__setattr__(self, "text_to_text", None)
        elif t2t is not None and self.label_names and len(t2t.targets) != len(self.label_names):
            raise ValueError(f"{self.name}: one text-to-text target per label")

    @property
    def num_labels(self) -> int:
        """Width of the prediction head: one output per class, or a single regression output."""
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def is_glue(self) -> bool:
        return self.glue_folder is not None


def _glue(
    name: str,
    folder: str,
    text_columns: tuple[str, ...],
    label_column: str,
    label_names: tuple[str, ...] | None,
    metrics: tuple[str, ...],
    main_metric: str,
    hub_text_columns: tuple[str, ...],
    fields: tuple[str, ...],
    *,
    id_column: str = "index",
    split_files: Mapping[str, str] | None = None,
    headerless_columns: Mapping[str, tuple[str, ...]] | None = None,
    hub_splits: Mapping[str, str] | None = None,
) -> TaskSpec:
    return TaskSpec(
        name=name,
        glue_folder=folder,
        text_columns=text_columns,
        label_column=label_column,
        label_names=label_names,
        problem=Problem.CLASSIFICATION if label_names else Problem.REGRESSION,
        metrics=metrics,
        main_metric=main_metric,
        split_files=split_files
        or {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"},
        id_column=id_column,
        headerless_columns=headerless_columns or {},
        hub=("nyu-mll/glue", name),
        hub_text_columns=hub_text_columns,
        hub_splits=hub_splits or {},
        # The reference's format: the task name as prefix, class indices as label words.
        text_to_text=TextToText(
            prefix=name,
            fields=fields,
            targets=STSB_BINS if label_names is None else tuple(map(str, range(len(label_names)))),
        ),
    )


_COLA_COLUMNS = ("source", "label", "original_label", "sentence")
_PAIR = ("sentence1", "sentence2")
_PAIR_FIELDS = ("sentence1:", "sentence2:")

# Main metrics: CoLA is scored by Matthews correlation alone. For MRPC/QQP (accuracy and F1)
# and STS-B (Pearson and Spearman) GLUE reports two numbers; we select epochs on accuracy and
# Pearson respectively, the figures the LoRA/adapter papers SHERL is compared with report.
GLUE_TASKS: Mapping[str, TaskSpec] = MappingProxyType(
    {
        "cola": _glue(
            "cola",
            "CoLA",
            ("sentence",),
            "label",
            ("unacceptable", "acceptable"),
            ("matthews",),
            "matthews",
            ("sentence",),
            ("sentence:",),
            headerless_columns={"train": _COLA_COLUMNS, "validation": _COLA_COLUMNS},
        ),
        "sst2": _glue(
            "sst2",
            "SST-2",
            ("sentence",),
            "label",
            ("negative", "positive"),
            ("accuracy",),
            "accuracy",
            ("sentence",),
            ("sentence:",),
        ),
        "mrpc": _glue(
            "mrpc",
            "MRPC",
            ("#1 String", "#2 String"),
            "Quality",
            ("not_equivalent", "equivalent"),
            ("accuracy", "f1"),
            "accuracy",
            _PAIR,
            _PAIR_FIELDS,
        ),
        "qqp": _glue(
            "qqp",
            "QQP",
            ("question1", "question2"),
            "is_duplicate",
            ("not_duplicate", "duplicate"),
            ("accuracy", "f1"),
            "accuracy",
            ("question1", "question2"),
            ("question1:", "question2:"),
            id_column="id",
        ),
        "stsb": _glue(
            "stsb",
            "STS-B",
            _PAIR,
            "score",
            None,
            ("pearson", "spearman"),
            "pearson",
            _PAIR,
            _PAIR_FIELDS,
        ),
        "mnli": _glue(
            "mnli",
            "MNLI",
            _PAIR,
            "gold_label",
            ("entailment", "neutral", "contradiction"),
            ("accuracy",),
            "accuracy",
            ("premise", "hypothesis"),
            # "hypothesis" without a colon: as the reference writes it
            ("premise:", "hypothesis"),
            split_files={
                "train": "train.tsv",
                "validation": "dev_matched.tsv",
                "test": "test_matched.tsv",
                "validation_mismatched": "dev_mismatched.tsv",
                "test_mismatched": "test_mismatched.tsv",
            },
            hub_splits={"validation": "validation_matched", "test": "test_matched"},
        ),
        "qnli": _glue(
            "qnli",
            "QNLI",
            ("question", "sentence"),
            "label",
            ("entailment", "not_entailment"),
            ("accuracy",),
            "accuracy",
            ("question", "sentence"),
            ("question:", "sentence:"),
        ),
        "rte": _glue(
            "rte",
            "RTE",
            _PAIR,
            "label",
            ("entailment", "not_entailment"),
            ("accuracy",),
            "accuracy",
            _PAIR,
            _PAIR_FIELDS,
        ),
        "wnli": _glue(
            "wnli",
            "WNLI",
            _PAIR,
            "label",
            ("not_entailment", "entailment"),
            ("accuracy",),
            "accuracy",
            _PAIR,
            _PAIR_FIELDS,
        ),
    }
)


def normalise_name(name: str) -> str:
    """Fold the spellings GLUE mirrors use (``SST-2``, ``sst_2``, ``sst2``) to one key."""
    return name.strip().lower().replace("-", "").replace("_", "")


def get_task(name: str) -> TaskSpec:
    """Look a GLUE task up the way people type it: any case, ``SST-2`` and ``STS-B`` included."""
    task = GLUE_TASKS.get(normalise_name(name))
    if task is None:
        raise ConfigError(f"unknown task {name!r} (--task): choose one of {', '.join(GLUE_TASKS)}")
    return task


def custom_task(
    text_columns: Sequence[str],
    label_column: str | None,
    label_names: Sequence[str] | None,
    problem: Problem | str,
) -> TaskSpec:
    """A task for the user's own files; its metrics follow GLUE's conventions for the problem.

    Binary classification also gets F1 of class 1 (as MRPC/QQP do); selection uses accuracy,
    or Pearson for regression, matching the GLUE tasks of the same kind.
    """
    try:
        problem = Problem(problem)
    except ValueError:
        raise ConfigError(
            f"unknown problem {problem!r}: choose classification or regression"
        ) from None
    if not 1 <= len(text_columns) <= 2 or len(set(text_columns)) != len(text_columns):
        raise ConfigError(
            f"--text-columns takes one or two distinct column names, got {list(text_columns)}"
        )
    if problem is Problem.REGRESSION:
        if label_names is not None:
            raise ConfigError("a regression task has no label names")
        metrics, main = ("pearson", "spearman"), "pearson"
        names = None
    else:
        names = tuple(label_names or ())
        if len(names) < 2:
            raise ConfigError(
                f"a classification task needs at least two labels, got {list(names)} "
                "(--label-column)"
            )
        if len(set(names)) != len(names):
            raise ConfigError(f"label names repeat: {list(names)}")
        metrics = ("accuracy", "f1") if len(names) == 2 else ("accuracy",)
        main = "accuracy"
    return TaskSpec(
        name="custom",
        glue_folder=None,
        text_columns=tuple(text_columns),
        label_column=label_column,
        label_names=names,
        problem=problem,
        metrics=metrics,
        main_metric=main,
    )

"""Load a task's splits into plain Python lists, from a GLUE folder, user files or the hub.

The cache is keyed on what the backbone saw, so loading must be exact and reproducible: text
is kept verbatim (GLUE's TSVs contain unmatched double quotes, so they are read with quoting
off; empty strings are kept as they are, since dropping rows would shift every index), labels
become class indices in the task's fixed order, and :meth:`SplitData.fingerprint` hashes the
result so a cache can tell whether it was built from the same rows.

Every problem with the input surfaces as one :class:`DataError` or :class:`ConfigError` line
that names the file, the row or line and the option to change (reading files: ``tables.py``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..errors import ConfigError, DataError
from .tables import RawSplit, format_of, raw_split, read_table
from .tasks import (
    HUB_ID_COLUMN,
    HUB_LABEL_COLUMN,
    Problem,
    TaskSpec,
    custom_task,
    normalise_name,
)

__all__ = ["SPLITS", "Dataset", "SplitData", "load_files", "load_glue", "parse_data_option"]

SPLITS = ("train", "validation", "test")


@dataclass
class SplitData:
    """One split as parallel lists: ``texts[c][i]`` is column ``c`` of row ``i``."""

    name: str
    texts: tuple[list[str], ...]
    labels: np.ndarray | None
    ids: list[str]

    def __post_init__(self) -> None:
        n = len(self.ids)
        if not self.texts or any(len(column) != n for column in self.texts):
            raise ValueError(f"split {self.name}: text columns and ids differ in length")
        if self.labels is not None and len(self.labels) != n:
            raise ValueError(f"split {self.name}: {len(self.labels)} labels for {n} rows")

    def __len__(self) -> int:
        return len(self.ids)

    def fingerprint(self) -> str:
        """SHA-256 of the rows' content, in order; the same on any machine and process.

        The split name is left out on purpose, so identical rows hash identically whichever
        split or file format they were loaded from. Strings are length-prefixed so that
        ``("ab", "c")`` and ``("a", "bc")`` differ.
        """
        digest = hashlib.sha256(b"sherl-cache/split/v1\0")
        digest.update(len(self.texts).to_bytes(8, "little"))
        for column in self.texts:
            _hash_strings(digest, column)
        _hash_strings(digest, self.ids)
        if self.labels is None:
            digest.update(b"unlabelled")
        else:
            labels = np.ascontiguousarray(self.labels, dtype=self.labels.dtype.newbyteorder("<"))
            digest.update(labels.dtype.str.encode("ascii"))
            digest.update(labels.tobytes())
        return digest.hexdigest()


def _hash_strings(digest: hashlib._Hash, values: Sequence[str]) -> None:
    digest.update(len(values).to_bytes(8, "little"))
    for start in range(0, len(values), 8192):  # chunked: one update per row is slow in Python
        encoded = [v.encode("utf-8", "surrogatepass") for v in values[start : start + 8192]]
        digest.update(b"".join(len(b).to_bytes(8, "little") + b for b in encoded))


@dataclass
class Dataset:
    """The splits of one task, plus a human-readable ``source`` recorded in cache metadata."""

    task: TaskSpec
    splits: dict[str, SplitData]
    source: str


# --------------------------------------------------------------------------- labels


def _label_key(value: object) -> str | None:
    """Canonical spelling of a label, so 1, 1.0, "1" and " 1 " name the same class."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return str(int(text))
        except ValueError:
            pass
        try:
            number = float(text)
        except ValueError:
            return text
        return str(int(number)) if number.is_integer() else text
    return None


def _label_number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _encode_labels(raw: RawSplit, task: TaskSpec, inferred: bool, hint: str) -> np.ndarray:
    """Map raw labels to class indices (int64) or scores (float32), rejecting anything else.

    A declared task accepts a label's name or its class index; an inferred one accepts only
    the names seen in train, so a typo in validation cannot land silently in some class.
    """
    values = raw.labels or []
    if task.problem is Problem.REGRESSION:
        scores = np.empty(len(values), dtype=np.float32)
        for row, value in enumerate(values):
            if value is None:
                raise DataError(f"{raw.where} row {row + 1}: the label is missing {hint}")
            number = _label_number(value)
            if number is None:
                raise DataError(
                    f"{raw.where} row {row + 1}: label {value!r} is not a number "
                    f"(task {task.name} is a regression) {hint}"
                )
            scores[row] = number
        return scores
    names = task.label_names or ()
    index = {name: i for i, name in enumerate(names)}
    classes = np.empty(len(values), dtype=np.int64)
    known: dict[object, int] = {}  # labels repeat a handful of values: resolve each once
    for row, value in enumerate(values):
        if value in known:
            classes[row] = known[value]
            continue
        if value is None:
            raise DataError(f"{raw.where} row {row + 1}: the label is missing {hint}")
        key = _label_key(value)
        found = index.get(key) if key is not None else None
        if found is None and not inferred and key is not None and key.lstrip("-").isdigit():
            found = int(key) if 0 <= int(key) < len(names) else None
        if found is None:
            if inferred:
                expected = f"it does not occur in the train split (labels: {', '.join(names)})"
            else:
                expected = f"expected one of {', '.join(names)} or a class index 0-{len(names) - 1}"
            raise DataError(f"{raw.where} row {row + 1}: label {value!r}: {expected} {hint}")
        classes[row] = known[value] = found
    return classes


def _infer_task(
    text_columns: Sequence[str], label_column: str, raws: Sequence[RawSplit]
) -> TaskSpec:
    """Guess the problem from the train labels (all labelled splits if there is no train).

    Numbers with a fractional part mean regression; anything else is a class vocabulary,
    sorted numerically for integers (so labels 0..K-1 keep their index) and as text otherwise.
    """
    labelled = [r for r in raws if r.labels is not None]
    basis = [r for r in labelled if r.name == "train"] or labelled
    values = list(dict.fromkeys(v for r in basis for v in r.labels or () if v is not None))
    if not values:
        raise DataError(f"no labels found in column {label_column!r} (--label-column)")
    numbers = [_label_number(v) for v in values]
    numeric = all(n is not None for n in numbers)
    if numeric and any(not n.is_integer() for n in numbers if n is not None):
        return custom_task(text_columns, label_column, None, Problem.REGRESSION)
    keys = {_label_key(v) for v in values}
    if None in keys:
        bad = next(v for v in values if _label_key(v) is None)
        raise DataError(f"label {bad!r} in column {label_column!r} is neither text nor a number")
    names = sorted((k for k in keys if k is not None), key=int if numeric else None)
    if len(names) < 2:
        raise DataError(
            f"every label in {basis[0].where} is {names[0]!r}; a classifier needs at least two "
            "classes (--label-column)"
        )
    return custom_task(text_columns, label_column, names, Problem.CLASSIFICATION)


def _finish(raws: Sequence[RawSplit], task: TaskSpec, inferred: bool, hint: str) -> dict:
    splits = {}
    for raw in raws:
        labels = None if raw.labels is None else _encode_labels(raw, task, inferred, hint)
        splits[raw.name] = SplitData(raw.name, raw.texts, labels, raw.ids)
    return splits


# --------------------------------------------------------------------------- GLUE


def _requested_splits(task: TaskSpec, splits: Sequence[str] | None) -> tuple[list[str], set[str]]:
    """Splits to load in canonical order, and which of them may be absent."""
    if splits is None:
        # A GLUE download always has train and dev; test is often deleted or never fetched.
        return [s for s in SPLITS if s in task.split_files], {"test"}
    unknown = [s for s in splits if s not in task.split_files]
    if unknown:
        raise ConfigError(
            f"unknown split {unknown[0]!r} for task {task.name} (--splits): "
            f"choose from {', '.join(task.split_files)}"
        )
    return [s for s in task.split_files if s in splits], set()


def _glue_folder(task: TaskSpec, root: Path) -> Path:
    folder = task.glue_folder or ""
    if not root.is_dir():
        raise DataError(f"GLUE data folder {root} does not exist (--data-dir)")
    if (root / folder).is_dir():
        return root / folder
    # Mirrors disagree on case and hyphens (sst2, STS-B); also accept the task folder itself.
    want = normalise_name(folder)
    for child in sorted(root.iterdir()):
        if child.is_dir() and normalise_name(child.name) == want:
            return child
    if normalise_name(root.name) == want and (root / task.split_files["train"]).is_file():
        return root
    raise DataError(
        f"no {folder} folder in {root} (--data-dir should be the GLUE root holding "
        f"{folder}/{task.split_files['train']})"
    )


def load_glue(
    task: TaskSpec, data_dir: Path | None, splits: Sequence[str] | None = None
) -> Dataset:
    """Load a GLUE task from GLUE's own TSV layout, or from the hub when no folder is given.

    With ``splits=None`` train and validation must exist and test is loaded when present;
    splits named explicitly must all exist. MNLI's mismatched sets load only when named.
    """
    if task.glue_folder is None:
        raise ConfigError(f"task {task.name!r} is not a GLUE task: give its files with --data")
    wanted, optional = _requested_splits(task, splits)
    if data_dir is None:
        return _load_hub(task, wanted, optional)
    folder = _glue_folder(task, Path(data_dir))
    hint = f"(--data-dir must hold GLUE's original {task.glue_folder} files)"
    hints = {"text": hint, "label": hint}
    raws = []
    for split in wanted:
        path = folder / task.split_files[split]
        if not path.is_file():
            if split in optional:
                continue
            raise DataError(f"{path} not found: the {split} split of {task.name} (--data-dir)")
        table = read_table(path, "tsv", task.headerless_columns.get(split))
        raws.append(
            raw_split(
                split,
                table,
                str(path),
                task.text_columns,
                task.label_column,
                task.id_column,
                False,
                hints,
            )
        )
    return Dataset(task, _finish(raws, task, False, hint), f"glue:{folder}")


def _load_hub(task: TaskSpec, wanted: Sequence[str], optional: set[str]) -> Dataset:
    try:
        import datasets  # optional: only this fallback needs it
    except ImportError:
        raise ConfigError(
            f"no --data-dir given and the 'datasets' library is not installed: pass --data-dir "
            f"with a GLUE folder holding {task.glue_folder}/, or pip install datasets"
        ) from None
    assert task.hub is not None and task.hub_text_columns is not None
    repo, config = task.hub
    try:
        hub = datasets.load_dataset(repo, config)
    except Exception as exc:  # network, auth and cache failures all call for local files
        first = (str(exc).strip().splitlines() or [""])[0]
        raise DataError(
            f"cannot load {repo}/{config} from the Hugging Face hub ({type(exc).__name__}: "
            f"{first}); pass --data-dir with a local GLUE folder"
        ) from None
    hint = f"(Hugging Face {repo}/{config})"
    hints = {"text": hint, "label": hint}
    raws = []
    for split in wanted:
        hub_split = task.hub_splits.get(split, split)
        if hub_split not in hub:
            if split in optional:
                continue
            raise DataError(f"{repo}/{config} has no {hub_split!r} split")
        table = pa.table(hub[hub_split].to_dict())
        raws.append(
            raw_split(
                split,
                table,
                f"hub:{repo}/{config} {hub_split}",
                task.hub_text_columns,
                HUB_LABEL_COLUMN,
                HUB_ID_COLUMN,
                False,
                hints,
            )
        )
    return Dataset(task, _finish(raws, task, False, hint), f"hub:{repo}/{config}")


# --------------------------------------------------------------------------- user files


def parse_data_option(value: str) -> dict[str, Path]:
    """Parse ``--data train=a.csv,validation=b.csv``; paths containing commas are unsupported."""
    example = "e.g. --data train=train.csv,validation=dev.csv"
    files: dict[str, Path] = {}
    for entry in value.split(","):
        entry = entry.strip()
        split, sep, path = entry.partition("=")
        split, path = split.strip(), path.strip()
        if not sep or not split or not path:
            raise ConfigError(f"bad --data entry {entry!r}: expected split=path, {example}")
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r} in --data: choose from {', '.join(SPLITS)}")
        if split in files:
            raise ConfigError(f"split {split!r} given twice in --data")
        files[split] = Path(path)
    return files


def load_files(
    files: Mapping[str, Path],
    text_columns: Sequence[str] | None,
    label_column: str | None,
    task: TaskSpec | None = None,
    id_column: str | None = None,
) -> Dataset:
    """Load the user's own splits (CSV, TSV, JSON Lines or Parquet, mixed freely).

    CSV honours double quotes (fields may hold commas, quotes and newlines); TSV is read with
    quoting off like GLUE's, so quote characters are ordinary text and tabs cannot occur in it.

    With ``task`` the labels must be that task's names or class indices; without, the problem
    and class vocabulary are inferred from train (see :func:`_infer_task`). ``label_column``
    None means the files carry no labels (prediction only), which needs a ``task`` to say what
    the classes are. A test file without the label column is loaded unlabelled. ``id_column``
    must exist in every file when given; otherwise the task's id column is used where present
    and row numbers elsewhere.
    """
    if not text_columns:
        raise ConfigError("--text-columns is required with --data unless --task names a GLUE task")
    text_columns = tuple(text_columns)
    if not files:
        raise ConfigError("no data files given (--data train=...,validation=...)")
    unknown = [s for s in files if s not in SPLITS]
    if unknown:
        raise ConfigError(
            f"unknown split {unknown[0]!r} in --data: choose from {', '.join(SPLITS)}"
        )
    if not 1 <= len(text_columns) <= 2 or len(set(text_columns)) != len(text_columns):
        raise ConfigError(
            f"--text-columns takes one or two distinct column names, got {list(text_columns)}"
        )
    if label_column is not None and label_column in text_columns:
        raise ConfigError(f"--label-column {label_column!r} is also one of --text-columns")
    if label_column is None and task is None:
        raise ConfigError("--label-column is required unless --task says what the labels are")
    hints = {"text": "(--text-columns)", "label": "(--label-column)"}
    raws = []
    for split in (s for s in SPLITS if s in files):
        path = Path(files[split])
        fmt = format_of(path, split)
        if not path.is_file():
            raise DataError(f"{path} not found (--data {split}=...)")
        table = read_table(path, fmt)
        ids_from = id_column or (task.id_column if task else None)
        raws.append(
            raw_split(
                split,
                table,
                str(path),
                text_columns,
                label_column,
                ids_from,
                id_column is not None,
                hints,
            )
        )
    inferred = task is None
    if task is None:
        task = _infer_task(text_columns, label_column or "", raws)
    else:
        task = replace(
            task,
            text_columns=text_columns,
            label_column=label_column,
            id_column=id_column or task.id_column,
        )
    source = "files:" + ",".join(f"{r.name}={files[r.name]}" for r in raws)
    return Dataset(task, _finish(raws, task, inferred, "(--label-column)"), source)

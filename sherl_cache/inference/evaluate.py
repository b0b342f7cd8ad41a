"""Score a trained run on a split: from a matching cache, else computed on the fly.

A cache stands in for the text only when it holds the very features the run would compute
(``cache_mismatch``); a GLUE test split without labels gives the submission file instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..data.files import SplitData, load_glue
from ..data.metrics import compute_metrics
from ..data.tasks import Problem
from ..errors import CacheMismatchError, ConfigError, DataError, SherlCacheError
from ..store.cache import Cache, open_cache
from .predictions import Predictions, load_input
from .run import Run, cache_mismatch

# GLUE submission file name per (task, split); the server wants class names for these tasks,
# class indices (0/1) for the other classification tasks and the score for STS-B.
SUBMISSION_FILES = {
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
SUBMIT_LABEL_NAMES = {"mnli", "qnli", "rte"}


@dataclass
class EvalResult:
    split: str
    source: str  # "cache PATH" or "computed on the fly"
    examples: int
    metrics: dict[str, float]  # empty when the split has no labels
    written: Path  # eval-<split>.json, or the GLUE submission file for unlabelled test splits


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
    found = choose_cache(run, split, data, cache, report)
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
        written = write_submission(run, split, predictions, output)
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


def choose_cache(
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
    recorded = run.record.cache
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


def write_submission(run: Run, split: str, predictions: Predictions, output: Path | None) -> Path:
    """GLUE's submission file for an unlabelled test split (``<TASK>.tsv``)."""
    name = SUBMISSION_FILES.get((run.task.name, split))
    if name is None:
        raise DataError(
            f"split {split!r} has no labels to score (--label-column); for its predictions "
            "use sherl-cache predict"
        )
    if run.task.problem is Problem.REGRESSION:
        values = [f"{v:.3f}" for v in predictions.outputs]
    elif run.task.name in SUBMIT_LABEL_NAMES:
        values = [str(label) for label in predictions.labels]
    else:
        values = [str(int(c)) for c in predictions.classes]  # type: ignore[union-attr]
    written = Path(output) if output is not None else run.path / f"{name}.tsv"
    written.parent.mkdir(parents=True, exist_ok=True)
    rows = "".join(f"{i}\t{v}\n" for i, v in zip(predictions.ids, values, strict=True))
    written.write_text("index\tprediction\n" + rows, encoding="utf-8")
    return written

"""The inference API in one import: open a run, predict, evaluate, read and write files.

The pieces live by concern: ``run`` (``Run``, ``load_run``), ``predictions`` (results and
their files, input files) and ``evaluate`` (scoring a split, GLUE submission files).
"""

from __future__ import annotations

from ..training.rundir import CHECKPOINT
from .evaluate import EvalResult, cache_mismatch, evaluate_run, write_submission
from .predictions import (
    OUTPUT_FORMATS,
    Prediction,
    Predictions,
    check_output_format,
    load_input,
    write_predictions,
)
from .run import Run, load_run

__all__ = [
    "CHECKPOINT",
    "OUTPUT_FORMATS",
    "EvalResult",
    "Prediction",
    "Predictions",
    "Run",
    "cache_mismatch",
    "check_output_format",
    "evaluate_run",
    "load_input",
    "load_run",
    "write_predictions",
    "write_submission",
]

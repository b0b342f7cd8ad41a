"""Logging and progress bars: what the library says, and where it may draw.

Library modules log to ``logging.getLogger(__name__)`` (all under ``sherl_cache``) and leave
handlers to the application, as the logging docs ask of libraries; the CLI installs one handler
on stderr. Progress bars redraw a line with carriage returns, which turns a log file into
noise, so they are drawn only where stderr is a terminal and ``TQDM_DISABLE`` is not set.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT = "sherl_cache"
QUIET, DEFAULT, VERBOSE = logging.WARNING, logging.INFO, logging.DEBUG

logging.getLogger(ROOT).addHandler(logging.NullHandler())


class _Stderr(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (test runners swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


def configure(level: int = DEFAULT) -> None:
    """One stderr handler on the package logger (replacing an earlier one) at ``level``."""
    logger = logging.getLogger(ROOT)
    for handler in [h for h in logger.handlers if isinstance(h, _Stderr)]:
        logger.removeHandler(handler)
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)


def level_of(quiet: bool, verbose: bool) -> int:
    return QUIET if quiet else VERBOSE if verbose else DEFAULT


def progress_allowed() -> bool:
    """Whether a progress bar may draw: stderr is a terminal and ``TQDM_DISABLE`` is unset."""
    if os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no"):
        return False
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def bar_disabled(progress: bool) -> bool:
    """tqdm's ``disable`` for a caller that asked for ``progress``."""
    return not (progress and progress_allowed())

"""One exception tree, so the CLI can print one line for every known failure.

Anything raised from here is a user-facing condition (bad input, missing file, mismatched
cache); anything else reaching the CLI is a bug and keeps its traceback.
"""

from __future__ import annotations


class SherlCacheError(Exception):
    """Base of every error the CLI reports as a single line."""


class ConfigError(SherlCacheError, ValueError):
    """An option or configuration value is invalid; the message names the CLI flag."""


class DataError(SherlCacheError):
    """Input data is missing, malformed or does not match the task."""


class ModelLoadError(SherlCacheError):
    """A backbone or tokenizer cannot be loaded or is of an unsupported family."""


class CacheError(SherlCacheError):
    """A cache store is missing, unreadable or corrupted."""


class CacheIncompleteError(CacheError):
    """The cache was not finished; the message names the command that finishes it."""


class CacheMismatchError(CacheError):
    """The cache was made from other inputs than the ones a run needs."""


class CacheLockedError(CacheError):
    """Another process is writing the same cache."""


class NumericOverflowError(SherlCacheError):
    """Activations do not fit the requested storage dtype."""


class RunError(SherlCacheError):
    """A run folder is missing, incomplete or would be overwritten."""


class MissingDependencyError(SherlCacheError):
    """An optional extra (e.g. ``plots``) is needed but not installed; the message says which."""

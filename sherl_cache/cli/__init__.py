"""The ``sherl-cache`` command line: parses options, calls the library, prints results.

Commands live in one module per subject and register on one typer app; each imports the
heavy parts of the library (torch, transformers) inside its body, so ``--help``, ``info``
and ``report`` start fast.
"""

from __future__ import annotations

import importlib

from .app import app

# Importing a module registers its commands; this order (the data path: caches, training,
# applying a run) is the order of ``sherl-cache --help``.
for _module in ("caches", "training", "runs"):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["app", "main"]


def main() -> None:
    app()

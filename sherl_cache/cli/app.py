"""The typer application every command module registers on, and how errors are shown.

Known failures (``SherlCacheError``) print one line and exit 2; ``--debug`` or
``SHERL_CACHE_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import typer

from ..errors import SherlCacheError

app = typer.Typer(
    name="sherl-cache",
    help="Cache a frozen backbone's hidden states once; train SHERL fusion + late layers from it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_state = {"debug": os.environ.get("SHERL_CACHE_DEBUG", "") not in ("", "0")}


def err(message: str) -> None:
    typer.echo(message, err=True)


def reports_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one line on stderr and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except SherlCacheError as exc:
            if _state["debug"]:
                raise
            err(f"error: {exc}")
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            err("interrupted; re-run the same command to resume")
            raise typer.Exit(code=130) from None

    return wrapper


@app.callback()
def main_options(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for known errors."),
) -> None:
    if debug:
        _state["debug"] = True


def human(n: float) -> str:
    """Bytes as a short size: 1.5 KiB, 3.2 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"

"""The typer application every command module registers on, and how errors are shown.

Known failures (``SherlCacheError``) print one line and exit 2; ``--debug`` or
``SHERL_CACHE_DEBUG=1`` shows the traceback instead. Every command takes ``--quiet`` and
``--verbose`` (added here, in the one wrapper every command has), which set the library's log
level; progress bars draw only where stderr is a terminal.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from typing import Any

import typer

from .. import __version__, logs
from ..errors import SherlCacheError

app = typer.Typer(
    name="sherl-cache",
    help="Cache a frozen backbone's hidden states once; train SHERL fusion + late layers from it.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)
_state = {"debug": os.environ.get("SHERL_CACHE_DEBUG", "") not in ("", "0")}


def err(message: str) -> None:
    typer.echo(message, err=True)


def _log_options(command: Callable[..., Any]) -> list[inspect.Parameter]:
    """The --quiet/--verbose parameters a command lacks (commands with progress bars declare
    their own --quiet)."""
    have = inspect.signature(command, eval_str=True).parameters
    extra = {
        "quiet": typer.Option(False, "--quiet", "-q", help="Only warnings and errors."),
        "verbose": typer.Option(False, "--verbose", "-v", help="Also debug messages."),
    }
    return [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=bool)
        for name, option in extra.items()
        if name not in have
    ]


def reports_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one line on stderr and exit code 2; set up logging from
    --quiet/--verbose first."""
    added = _log_options(command)
    takes_quiet = all(p.name != "quiet" for p in added)

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        verbose = kwargs.pop("verbose", False)
        quiet = kwargs["quiet"] if takes_quiet else kwargs.pop("quiet", False)
        logs.configure(logs.level_of(quiet, verbose))
        if takes_quiet:  # the command's --quiet turns its bars off; so does a non-terminal
            kwargs["quiet"] = quiet or not logs.progress_allowed()
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

    params = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for p in inspect.signature(command, eval_str=True).parameters.values()
    ]
    wrapper.__signature__ = inspect.Signature([*params, *added])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in [*params, *added]}
    return wrapper


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"sherl-cache {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for known errors."),
    version: bool = typer.Option(
        False,
        "--version",
        help="Print the version and exit.",
        callback=_print_version,
        is_eager=True,
    ),
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

"""Command-line options derived from the settings dataclasses, plus the few shared by commands.

A command declares ``settings: dict`` where the options of a settings class belong; the
``settings_options`` decorator puts one option per field there (flag, default, help, panel
and choices all read off the field) and hands the parsed values to the command in that dict.
Typer reads the generated ``__signature__`` and ``__annotations__`` like any written ones.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import MISSING
from typing import Any

import typer

from ..config.extract import ExtractConfig
from ..config.settings import (
    choices_of,
    default_of,
    field_types,
    flag_of,
    settings_fields,
    without_none,
)
from ..runtime import DEVICES

# Options whose default a user sets once for a shell, the way HF_HOME sets the hub cache.
ENVVARS = {"--cache-root": "SHERL_CACHE_ROOT"}


def choices_metavar(choices: Collection[str]) -> str:
    """How ``--help`` lists the choices (typer's own style for a ``Literal``)."""
    return "<" + "|".join(choices) + ">"


def split_list(value: str | None) -> tuple[str, ...] | None:
    """``a, b`` -> ("a", "b"): the command-line form of a tuple of names."""
    if value is None:
        return None
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _derived(
    cls: type, name: str, *, optional: bool, parser: Callable[[str], Any] | None
) -> tuple[inspect.Parameter, Callable[[Any], Any] | None]:
    """The typer parameter for one field, and what turns its text into the field's value.

    Choices are listed in ``--help`` but checked by the settings class, so a bad one is the
    same one-line error (naming the flag) as any other bad value.
    """
    f = settings_fields(cls)[name]
    hint, nullable = without_none(field_types(cls)[name])
    choices = choices_of(hint)
    if parser is not None or choices is not None:
        hint = str
    elif typing.get_origin(hint) is tuple:
        hint, parser = str, split_list
    default = None if optional else (... if f.default is MISSING else default_of(cls, name))
    if nullable or default is None:
        hint = hint | None
    info = typer.Option(
        default,
        flag_of(f),
        envvar=ENVVARS.get(flag_of(f)),
        help=f.metadata["help"],
        hidden=f.metadata["hidden"],
        rich_help_panel=f.metadata["panel"],
        metavar=choices_metavar(choices) if choices else None,
    )
    param = inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=hint)
    return param, parser


def settings_options(
    cls: type,
    *,
    only: Collection[str] | None = None,
    optional: Collection[str] = (),
    parsers: Mapping[str, Callable[[str], Any]] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give the command one option per field of ``cls`` (or ``only`` those).

    Fields in ``optional`` default to None (the command fills them in or leaves them to the
    library); ``parsers`` turn the text of fields that are not plain scalars into their value
    (``--data train=a.csv``); tuples of names are written comma separated.
    """
    parsers = parsers or {}
    derived = {
        name: _derived(cls, name, optional=name in optional, parser=parsers.get(name))
        for name in settings_fields(cls)
        if only is None or name in only
    }

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        params: list[inspect.Parameter] = []
        for p in inspect.signature(command, eval_str=True).parameters.values():
            if p.name == "settings":
                params.extend(param for param, _ in derived.values())
            else:
                params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY))

        @functools.wraps(command)
        def with_settings(**kwargs: Any) -> Any:
            settings = {name: kwargs.pop(name) for name in derived}
            for name, (_, parse) in derived.items():
                if parse is not None and settings[name] is not None:
                    settings[name] = parse(settings[name])
            return command(settings=settings, **kwargs)

        with_settings.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        with_settings.__annotations__ = {p.name: p.annotation for p in params}
        return with_settings

    return decorate


# --- options that are not settings fields, shared by several commands ---------------------------


def device_option(default: str | None, what: str) -> Any:
    return typer.Option(
        default,
        "--device",
        help=f"Where {what} runs (auto: CUDA when present).",
        metavar=choices_metavar(DEVICES),
    )


def quiet_option() -> Any:
    return typer.Option(False, "--quiet", "-q", help="No progress bars; only warnings and errors.")


def cache_root_option(help: str = "Where to look for caches.") -> Any:
    return typer.Option(
        default_of(ExtractConfig, "cache_root"),
        "--cache-root",
        envvar=ENVVARS["--cache-root"],
        help=help,
    )


def workers_option(default: int | None, help: str) -> Any:
    return typer.Option(default, "--workers", help=help)


def scheduler_option(help: str = "An existing dask cluster (tcp://host:8786).") -> Any:
    return typer.Option(None, "--scheduler", help=help)


def text_columns_option() -> Any:
    return typer.Option(
        None, "--text-columns", help="Text column(s) of --input (default: the task's)."
    )

"""Declaring a settings field once: its default, flag, help text, bound and (through a
``Literal`` type) its choices.

The CLI's options, the pipeline TOML schema and sweep values are all read off these
declarations, and ``validate`` checks them, so none of them restates a default, a choice or
an error message.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, fields
from typing import Any, Literal

from ..errors import ConfigError
from ..layers import is_layer_spec


@dataclass(frozen=True)
class Bound:
    """A condition on a field's value; ``words`` finish the sentence "--flag must be ..."."""

    holds: Callable[[Any], bool]
    words: str


def at_least(low: int) -> Bound:
    return Bound(lambda v: v >= low, f"at least {low}")


POSITIVE = Bound(lambda v: v > 0, "positive")
POSITIVE_NUMBER = Bound(lambda v: v > 0 and math.isfinite(v), "a positive number")
NON_NEGATIVE = Bound(lambda v: v >= 0, ">= 0")
FRACTION = Bound(lambda v: 0 <= v < 1, "in [0, 1)")
LAYER_SPEC = Bound(
    lambda v: v.strip().lower() == "default" or is_layer_spec(v),
    "default, all, every:N or indices like 0,4,8",
)


def setting(
    default: Any = MISSING,
    *,
    help: str,
    flag: str | None = None,
    bound: Bound | None = None,
    panel: str | None = None,
    hidden: bool = False,
) -> Any:
    """A dataclass field carrying what its command-line option needs.

    ``flag`` defaults to the field name with dashes; ``panel`` groups options in ``--help``;
    ``hidden`` options are for tuning and tests, left out of ``--help``.
    """
    metadata = {"help": help, "flag": flag, "bound": bound, "panel": panel, "hidden": hidden}
    return dataclasses.field(default=default, metadata=metadata)


def flag_of(f: Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def settings_fields(cls: type) -> dict[str, Field]:
    return {f.name: f for f in fields(cls)}


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The evaluated type of each field (the modules use ``from __future__ import annotations``)."""
    return typing.get_type_hints(cls)


def without_none(hint: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (itself, False)."""
    args = typing.get_args(hint)
    if type(None) not in args:
        return hint, False
    (rest,) = (a for a in args if a is not type(None))
    return rest, True


def choices_of(hint: Any) -> tuple[str, ...] | None:
    """The values a ``Literal`` (optionally ``| None``) allows; None for any other type."""
    hint, _ = without_none(hint)
    if typing.get_origin(hint) is Literal:
        return tuple(typing.get_args(hint))
    return None


def default_of(cls: type, name: str) -> Any:
    f = settings_fields(cls)[name]
    return f.default_factory() if f.default_factory is not MISSING else f.default


def validate(config: Any) -> None:
    """Check every field's choices and bound; the message names the field's flag."""
    types = field_types(type(config))
    for f in fields(config):
        value = getattr(config, f.name)
        if value is None:
            continue
        choices = choices_of(types[f.name])
        if choices is not None and value not in choices:
            raise ConfigError(f"unknown {flag_of(f)} {value!r}: choose {', '.join(choices)}")
        bound = f.metadata.get("bound")
        if bound is not None and not bound.holds(value):
            raise ConfigError(f"{flag_of(f)} must be {bound.words}, got {value}")

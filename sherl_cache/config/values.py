"""Values of TrainConfig fields given as text (``--grid``, ``--set``, ``--range``) or TOML,
parsed and checked against the field's own type, so sweeps and pipelines accept exactly what
``train`` does."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .settings import choices_of, field_types, without_none
from .train import TrainConfig

# TrainConfig fields a sweep never varies: where things are, and the cache's own task.
_NOT_SETTABLE = ("cache", "out", "overwrite", "task")
# Settable for a whole sweep (--set, --device, --model) but not swept: they say where a
# trial runs or where weights are read, never what is learnt.
_FIXED_ONLY = ("device", "model")


@dataclass(frozen=True)
class FieldKind:
    """How a TrainConfig field's text is parsed: its base type, choices and whether None is ok."""

    name: str
    base: type
    choices: tuple[str, ...] | None
    optional: bool


def _field_kinds() -> dict[str, FieldKind]:
    kinds = {}
    for name, hint in field_types(TrainConfig).items():
        if name in _NOT_SETTABLE:
            continue
        base, optional = without_none(hint)
        choices = choices_of(base)
        kinds[name] = FieldKind(name, str if choices else base, choices, optional)
    return kinds


FIELD_KINDS: dict[str, FieldKind] = _field_kinds()
SWEEPABLE: tuple[str, ...] = tuple(k for k in FIELD_KINDS if k not in _FIXED_ONLY)
SETTABLE: tuple[str, ...] = tuple(FIELD_KINDS)


def parse_value(key: str, raw: Any, flag: str = "--grid") -> Any:
    """One value of a TrainConfig field, from CLI text or a TOML value, checked for its type.

    Text is parsed ("3e-3" -> 0.003, "none" -> None for optional fields); a TOML value must
    already have the right type (an int is accepted where a float is expected).
    """
    allowed = SETTABLE if flag == "--set" else SWEEPABLE
    kind = FIELD_KINDS.get(key)
    if kind is None or key not in allowed:
        raise ConfigError(f"unknown {flag} key {key!r}: choose from {', '.join(allowed)}")
    where = f"{flag} {key}={raw!r}"
    if isinstance(raw, str):
        text = raw.strip()
        if kind.optional and text.lower() in ("none", "null"):
            return None
        if kind.base is bool:
            if text.lower() not in ("true", "false"):
                raise ConfigError(f"{where}: {key} takes true or false")
            return text.lower() == "true"
        if kind.base in (int, float):
            try:
                value = kind.base(text)
            except ValueError:
                noun = "an integer" if kind.base is int else "a number"
                raise ConfigError(f"{where}: {key} takes {noun}") from None
            if kind.base is float and not math.isfinite(value):
                raise ConfigError(f"{where}: {key} takes a finite number")
            return value
        value: Any = text
    elif raw is None:
        if not kind.optional:
            raise ConfigError(f"{where}: {key} needs a value")
        return None
    elif kind.base is bool:
        if not isinstance(raw, bool):
            raise ConfigError(f"{where}: {key} takes true or false")
        return raw
    elif kind.base is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ConfigError(f"{where}: {key} takes an integer, got {type(raw).__name__}")
        return raw
    elif kind.base is float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise ConfigError(f"{where}: {key} takes a number, got {type(raw).__name__}")
        return float(raw)
    else:
        if not isinstance(raw, str):
            raise ConfigError(f"{where}: {key} takes a string, got {type(raw).__name__}")
        value = raw
    if kind.choices and value not in kind.choices:
        raise ConfigError(f"{where}: choose one of {', '.join(kind.choices)}")
    return value


def _split_item(item: str, flag: str) -> tuple[str, str]:
    key, sep, rest = item.partition("=")
    key = key.strip().replace("-", "_")  # --grid late-layers=1,2 reads like the train flag
    if not sep or not key:
        raise ConfigError(f"{flag} {item!r}: expected key=value")
    return key, rest


def unique(values: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(dict.fromkeys(values))


def parse_grid(items: Sequence[str]) -> dict[str, tuple[Any, ...]]:
    """``--grid key=v1,v2`` items to typed value lists.

    Values are comma separated; when a value itself holds commas (``tap=0,2,4``) separate the
    values with semicolons instead: ``tap=0,2,4;default``.
    """
    grid: dict[str, tuple[Any, ...]] = {}
    for item in items:
        key, rest = _split_item(item, "--grid")
        if key in grid:
            raise ConfigError(f"--grid {key} is given twice; list all its values in one --grid")
        parts = rest.split(";") if ";" in rest else rest.split(",")
        values = [part.strip() for part in parts if part.strip()]
        if not values:
            raise ConfigError(f"--grid {key}= lists no values (expected {key}=v1,v2,...)")
        grid[key] = unique([parse_value(key, value, "--grid") for value in values])
    return grid


def parse_fixed(items: Sequence[str]) -> dict[str, Any]:
    """``--set key=value`` items: one value for every trial."""
    fixed: dict[str, Any] = {}
    for item in items:
        key, rest = _split_item(item, "--set")
        fixed[key] = parse_value(key, rest, "--set")
    return fixed


@dataclass(frozen=True)
class Range:
    """A numeric interval that ``--random`` samples ``key`` from, uniformly or log-uniformly."""

    key: str
    low: float
    high: float
    log: bool = False

    def __post_init__(self) -> None:
        kind = FIELD_KINDS.get(self.key)
        if kind is None or self.key not in SWEEPABLE or kind.base not in (int, float):
            numeric = [k for k in SWEEPABLE if FIELD_KINDS[k].base in (int, float)]
            raise ConfigError(
                f"--range {self.key}: not a numeric sweep key; choose from {', '.join(numeric)}"
            )
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
            raise ConfigError(f"--range {self.key}: needs low < high, got {self.low}:{self.high}")
        if self.log and self.low <= 0:
            raise ConfigError(f"--range {self.key}: a log range needs low > 0, got {self.low}")

    def sample(self, rng: random.Random) -> int | float:
        if self.log:
            x = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            x = rng.uniform(self.low, self.high)
        if FIELD_KINDS[self.key].base is int:
            return int(min(max(round(x), math.ceil(self.low)), math.floor(self.high)))
        return float(f"{x:.3g}")  # three digits: short trial ids, no false precision

    def to_text(self) -> str:
        return f"{self.low:g}:{self.high:g}" + (":log" if self.log else "")


def parse_range(item: str) -> Range:
    """``--range key=low:high[:log|:lin]``."""
    key, rest = _split_item(item, "--range")
    parts = [p.strip() for p in rest.split(":")]
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("log", "lin")):
        raise ConfigError(f"--range {item!r}: expected key=low:high or key=low:high:log")
    try:
        low, high = float(parts[0]), float(parts[1])
    except ValueError:
        raise ConfigError(f"--range {item!r}: low and high must be numbers") from None
    return Range(key, low, high, log=len(parts) == 3 and parts[2] == "log")

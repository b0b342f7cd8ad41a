"""Backbone families, registered by name: the only place that knows one architecture from
another. Adding a family is one module here plus one entry in ``_REGISTRY``."""

from __future__ import annotations

from typing import Any

from ..errors import ModelLoadError
from .base import Family, LateRoute
from .bert import BertFamily
from .gpt2 import GPT2Family
from .roberta import RobertaFamily
from .rotary import rotary_families
from .t5 import T5Family

__all__ = ["FAMILIES", "Family", "LateRoute", "family_of", "get_family"]

_REGISTRY: dict[str, Family] = {
    family.name: family
    for family in (
        BertFamily(),
        RobertaFamily(),
        T5Family(),
        *rotary_families(),
        GPT2Family(),
    )
}
_BY_MODEL_TYPE: dict[str, Family] = {t: f for f in _REGISTRY.values() for t in f.model_types}
FAMILIES: tuple[str, ...] = tuple(_REGISTRY)


def get_family(name: str) -> Family:
    """The family a cache or run recorded by name."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelLoadError(
            f"unknown backbone family {name!r}: this sherl-cache supports {', '.join(FAMILIES)}"
        ) from None


def family_of(config: Any) -> Family:
    """The family of a transformers config (by ``model_type``)."""
    family = _BY_MODEL_TYPE.get(config.model_type)
    if family is None:
        raise ModelLoadError(
            f"unsupported architecture {config.model_type!r} (--model): "
            f"supported: {', '.join(FAMILIES)}"
        )
    return family

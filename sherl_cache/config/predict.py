"""Settings of applying a trained run (``sherl-cache predict`` and ``evaluate``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..runtime import Device
from .settings import POSITIVE, setting, validate


@dataclass(frozen=True)
class PredictConfig:
    """Which backbone a run is applied with, where, and how many examples at once."""

    model: str | None = setting(
        None, help="Backbone (default: the run's; must have the same weights)."
    )
    device: Device = setting("auto", help="Where the model runs (auto: CUDA when present).")
    batch_size: int = setting(32, help="Examples per forward pass.", bound=POSITIVE)

    def __post_init__(self) -> None:
        validate(self)

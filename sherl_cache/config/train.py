"""Stage two's settings: what ``sherl-cache train`` takes, validated on creation."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args

from ..errors import ConfigError
from ..runtime import DEVICES, Device

FusionVariant = Literal["linear", "gated"]
FUSION_VARIANTS: tuple[str, ...] = get_args(FusionVariant)
LateMode = Literal["frozen", "full", "lora"]
LATE_MODES = ("frozen", "full", "lora")
Pool = Literal["mean", "first"]
POOLS = ("mean", "first")


DEFAULT_MEMORY_BUDGET = 4 << 30  # host bytes of cached states one split may hold at once


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``sherl-cache train`` takes; validated on creation, errors name the flag."""

    cache: str
    out: Path
    task: str | None = None
    tap: str = "default"
    late_layers: int = 1
    late_mode: LateMode = "frozen"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    reduction: int = 8
    fusion_variant: FusionVariant = "linear"
    fusion_dropout: float = 0.1
    head_dropout: float = 0.1
    pool: Pool = "mean"
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    epochs: int = 20
    batch_size: int = 100
    seed: int = 0
    train_split: str = "train"
    eval_split: str = "validation"
    device: Device = "auto"
    max_train_examples: int | None = None
    memory_budget_mb: int = DEFAULT_MEMORY_BUDGET >> 20  # host memory for cached states per split
    model: str | None = None  # where the late layers' weights are read; default: the cache's
    overwrite: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.late_layers >= 1, f"--late-layers must be at least 1, got {self.late_layers}"),
            (
                self.late_mode in LATE_MODES,
                f"unknown --late-mode {self.late_mode!r}: choose frozen, full, lora",
            ),
            (self.lora_rank >= 1, f"--lora-rank must be positive, got {self.lora_rank}"),
            (self.reduction >= 1, f"--reduction must be at least 1, got {self.reduction}"),
            (
                self.fusion_variant in FUSION_VARIANTS,
                f"unknown --fusion-variant {self.fusion_variant!r}",
            ),
            (
                0 <= self.fusion_dropout < 1,
                f"--fusion-dropout must be in [0, 1), got {self.fusion_dropout}",
            ),
            (
                0 <= self.head_dropout < 1,
                f"--head-dropout must be in [0, 1), got {self.head_dropout}",
            ),
            (self.pool in POOLS, f"unknown --pool {self.pool!r}: choose mean or first"),
            (
                self.lr > 0 and math.isfinite(self.lr),
                f"--lr must be a positive number, got {self.lr}",
            ),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (
                0 <= self.warmup_ratio < 1,
                f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}",
            ),
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be positive, got {self.batch_size}"),
            (
                self.device in DEVICES,
                f"unknown device {self.device!r} (--device): choose auto, cpu, cuda",
            ),
            (
                self.max_train_examples is None or self.max_train_examples >= 1,
                "--max-train-examples must be positive",
            ),
            (self.memory_budget_mb >= 1, "--memory-budget-mb must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["out"] = str(self.out)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["out"] = Path(values["out"])
        return cls(**values)

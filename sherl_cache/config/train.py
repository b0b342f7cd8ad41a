"""Stage two's settings: what ``sherl-cache train`` takes, validated on creation.

Each field's default, flag, help, bound and choices are written here once; the CLI options,
the pipeline TOML keys and sweep values are derived from them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args

from ..runtime import Device
from .settings import (
    FRACTION,
    LAYER_SPEC,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_NUMBER,
    at_least,
    setting,
    validate,
)

FusionVariant = Literal["linear", "gated"]
FUSION_VARIANTS: tuple[str, ...] = get_args(FusionVariant)
LateMode = Literal["frozen", "full", "lora"]
Pool = Literal["mean", "first", "last"]
Schedule = Literal["linear", "cosine", "constant"]
Precision = Literal["auto", "bf16", "float32"]
ReportTo = Literal["none", "tensorboard"]

DEFAULT_MEMORY_BUDGET = 4 << 30  # host bytes of cached states one split may hold at once

INPUT, FUSION, LATE, OPTIMISER, RUN = "Input", "Fusion and head", "Late route", "Optimiser", "Run"


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``sherl-cache train`` takes; validated on creation, errors name the flag."""

    cache: str = setting(help="Cache path (default: find one in --cache-root).", panel=INPUT)
    out: Path = setting(help="Run folder (default: runs/<task>-<time>).", panel=RUN)
    task: str | None = setting(None, help="Task the cache was made for (checked).", panel=INPUT)
    tap: str = setting(
        "default",
        help="Tapped hidden states: default | all | i,j,k | every:N.",
        bound=LAYER_SPEC,
        panel=FUSION,
    )
    late_layers: int = setting(
        1, help="Pre-trained layers after the fusion (k).", bound=at_least(1), panel=LATE
    )
    late_mode: LateMode = setting(
        "frozen", help="How the late layers learn: frozen, full fine-tuning or LoRA.", panel=LATE
    )
    lora_rank: int = setting(8, help="LoRA rank (--late-mode lora).", bound=POSITIVE, panel=LATE)
    lora_alpha: float = setting(16.0, help="LoRA scaling alpha (--late-mode lora).", panel=LATE)
    reduction: int = setting(8, help="Fusion width d/r.", bound=at_least(1), panel=FUSION)
    fusion_variant: FusionVariant = setting(
        "linear", help="Fusion projection: linear (+LayerNorm) or gated.", panel=FUSION
    )
    fusion_dropout: float = setting(
        0.1, help="Dropout inside the fusion.", bound=FRACTION, panel=FUSION
    )
    head_dropout: float = setting(
        0.1, help="Dropout before the classification head.", bound=FRACTION, panel=FUSION
    )
    pool: Pool | None = setting(
        None,
        help="Head pooling: masked mean of the real tokens, the first or the last real token "
        "(default: the family's: mean for encoders, last for decoder-only models).",
        panel=FUSION,
    )
    lr: float = setting(
        3e-3, help="Peak learning rate (AdamW).", bound=POSITIVE_NUMBER, panel=OPTIMISER
    )
    weight_decay: float = setting(
        0.0, help="AdamW weight decay.", bound=NON_NEGATIVE, panel=OPTIMISER
    )
    warmup_ratio: float = setting(
        0.06, help="Share of steps with a linear warm-up.", bound=FRACTION, panel=OPTIMISER
    )
    epochs: int = setting(
        20, help="Passes over the training split.", bound=at_least(1), panel=OPTIMISER
    )
    batch_size: int = setting(100, help="Examples per step.", bound=POSITIVE, panel=OPTIMISER)
    grad_accum: int = setting(
        1,
        help="Batches whose gradients add up before each optimiser step.",
        bound=POSITIVE,
        panel=OPTIMISER,
    )
    max_grad_norm: float | None = setting(
        None,
        help="Clip the gradient norm to this before each step (default: no clipping).",
        bound=POSITIVE_NUMBER,
        panel=OPTIMISER,
    )
    lr_scheduler: Schedule = setting(
        "linear",
        flag="--scheduler",
        help="Learning-rate schedule after the warm-up (transformers.get_scheduler).",
        panel=OPTIMISER,
    )
    early_stopping: int | None = setting(
        None,
        help="Stop after N epochs without a better selection metric (default: every epoch).",
        bound=POSITIVE,
        panel=OPTIMISER,
    )
    seed: int = setting(0, help="Seed of initialisation, shuffling and dropout.", panel=OPTIMISER)
    train_split: str = setting("train", help="Split to train on.", panel=INPUT)
    eval_split: str = setting("validation", help="Split scored after every epoch.", panel=INPUT)
    device: Device = setting(
        "auto", help="Where training runs (auto: CUDA when present).", panel=RUN
    )
    max_train_examples: int | None = setting(
        None, help="Train on the first N examples only.", bound=POSITIVE, panel=INPUT
    )
    memory_budget_mb: int = setting(
        DEFAULT_MEMORY_BUDGET >> 20,
        help="Host memory for cached states; larger splits stream.",
        bound=POSITIVE,
        panel=RUN,
    )
    model: str | None = setting(
        None,
        help="Backbone: finds its cache; the late layers' weights (default: the cache's).",
        panel=INPUT,
    )
    precision: Precision = setting(
        "auto",
        help="Late route: bf16 autocast on CUDA (auto: where the GPU supports bf16); "
        "float32 on the CPU.",
        panel=RUN,
    )
    report_to: ReportTo = setting(
        "none",
        help="Experiment tracking: per-step loss and per-epoch metrics in <out>/tensorboard "
        "(pip install 'sherl-cache[tensorboard]').",
        panel=RUN,
    )
    overwrite: bool = setting(False, help="Replace an existing run in --out.", panel=RUN)

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["out"] = str(self.out)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["out"] = Path(values["out"])
        if isinstance(values.get("tap"), list):  # a run's record lists the resolved taps
            values["tap"] = ",".join(map(str, values["tap"]))
        return cls(**values)

"""Stage two's settings: what ``sherl-cache train`` takes, validated on creation.

Each field's default, flag, help, bound and choices are written here once; the CLI options,
the pipeline TOML keys and sweep values are derived from them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args

from ..errors import ConfigError
from ..runtime import Device
from .settings import (
    FRACTION,
    LAYER_SPEC,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_NUMBER,
    Bound,
    at_least,
    setting,
    validate,
)

FusionVariant = Literal["linear", "gated"]
FUSION_VARIANTS: tuple[str, ...] = get_args(FusionVariant)
FusionInit = Literal["reference", "residual"]
FUSION_INITS: tuple[str, ...] = get_args(FusionInit)


def default_fusion_init(late_mode: str) -> FusionInit:
    """Tuned late layers start from their pre-trained input: measured on MiniLM MRPC held-out
    (seed 0), residual beat reference by 14 points with every layer tuned and 6 with three;
    with frozen late layers (SHERL's own recipe) the two tie, and the reference start stays."""
    return "reference" if late_mode == "frozen" else "residual"


LateMode = Literal["frozen", "full", "lora"]
Pool = Literal["mean", "first", "last"]
Schedule = Literal["linear", "cosine", "constant"]
Precision = Literal["auto", "bf16", "float32"]
ReportTo = Literal["none", "tensorboard"]
Batching = Literal["random", "bucketed"]

SMALL_TASK_TRAIN_EXAMPLES = 10_000  # below it, auto selection halves the validation split
AUTO_HOLDOUT = 1_000  # training examples auto selection holds out on larger tasks


@dataclass(frozen=True)
class SelectOn:
    """A parsed ``--select-on``: where the best epoch is chosen."""

    kind: Literal["auto", "same", "validation", "train"]
    amount: float | int | None = None

    @classmethod
    def parse(cls, spec: str) -> SelectOn:
        text = spec.strip().lower()
        if text in ("auto", "same"):
            return cls(text)  # type: ignore[arg-type]
        kind, _, value = text.partition(":")
        try:
            if kind == "validation" and 0 < float(value) < 1:
                return cls("validation", float(value))
            if kind == "train" and int(value) > 0:
                return cls("train", int(value))
        except ValueError:
            pass
        raise ConfigError(f"--select-on must be {SELECT_SPEC.words}, got {spec!r}")


def _is_select_spec(spec: str) -> bool:
    try:
        SelectOn.parse(spec)
    except ConfigError:
        return False
    return True


SELECT_SPEC = Bound(_is_select_spec, "auto, same, validation:F with 0 < F < 1, or train:N")

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
        1,
        help="Pre-trained layers after the fusion (k; 0: a probe on the fused states).",
        bound=at_least(0),
        panel=LATE,
    )
    late_mode: LateMode = setting(
        "frozen", help="How the late layers learn: frozen, full fine-tuning or LoRA.", panel=LATE
    )
    late_lr: float | None = setting(
        None,
        help="Peak learning rate of the late layers' trained weights (--late-mode full or "
        "lora; default: --lr).",
        bound=POSITIVE_NUMBER,
        panel=LATE,
    )
    late_checkpointing: bool = setting(
        False,
        help="Recompute each late layer's activations in the backward pass instead of keeping "
        "them (activation checkpointing): less memory for about one more forward of the late "
        "route per step; results unchanged.",
        panel=LATE,
    )
    lora_rank: int = setting(8, help="LoRA rank (--late-mode lora).", bound=POSITIVE, panel=LATE)
    lora_alpha: float = setting(16.0, help="LoRA scaling alpha (--late-mode lora).", panel=LATE)
    reduction: int = setting(8, help="Fusion width d/r.", bound=at_least(1), panel=FUSION)
    fusion_variant: FusionVariant | None = setting(
        None,
        help="Fusion projection: linear (+LayerNorm) or gated (default: the family's reference "
        "module: gated for T5, linear otherwise).",
        panel=FUSION,
    )
    fusion_dropout: float | None = setting(
        None,
        help="Dropout inside the fusion (default: the family's reference: 0 for T5, 0.1 "
        "otherwise).",
        bound=FRACTION,
        panel=FUSION,
    )
    fusion_init: FusionInit | None = setting(
        None,
        help="Fusion start: reference (gate closed, the late layers first see the fused "
        "branch alone, as the SHERL code starts) or residual (gate open, fused branch zero: "
        "training starts from the pre-trained model). Default: residual when the late "
        "layers train (--late-mode full or lora), reference when they are frozen.",
        panel=FUSION,
    )
    tap_dropout: float = setting(
        0.0,
        help="Dropout on the cached states the fusion and late layers read, in training only: "
        "the noise the frozen layers' own dropout would add if they ran in train mode.",
        bound=FRACTION,
        panel=FUSION,
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
    warmup_steps: int | None = setting(
        None,
        help="Optimiser steps of linear warm-up; replaces --warmup-ratio when given.",
        bound=NON_NEGATIVE,
        panel=OPTIMISER,
    )
    epochs: int = setting(
        20, help="Passes over the training split.", bound=at_least(1), panel=OPTIMISER
    )
    batch_size: int = setting(100, help="Examples per step.", bound=POSITIVE, panel=OPTIMISER)
    batching: Batching = setting(
        "random",
        help="Batch membership: random, or bucketed (examples of similar length together, "
        "batch order still shuffled; less padding, faster).",
        panel=OPTIMISER,
    )
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
    eval_split: str = setting(
        "validation", help="Labelled split the run is scored on.", panel=INPUT
    )
    select_on: str = setting(
        "auto",
        help="Data the best epoch is chosen on, disjoint from what is reported: "
        "validation:F (a seeded fraction F of --eval-split; the rest is reported), "
        "train:N (N held-out training examples; --eval-split is reported), "
        "auto (the SHERL reference: validation:0.5 under 10,000 training examples, else "
        "train:1000) or same (choose and report on --eval-split: biased upward).",
        bound=SELECT_SPEC,
        panel=INPUT,
    )
    selection_seed: int = setting(
        42,
        help="Seed of the --select-on split; the same for every trial of a sweep.",
        panel=INPUT,
    )
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
        help="Late route: bf16 runs it under bf16 autocast on any device, its frozen linears "
        "(and LoRA's base layers) stored in bfloat16, trained weights float32; auto: bf16 on "
        "CUDA GPUs that support it, float32 on the CPU; float32: never bf16.",
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
        if self.late_layers == 0 and self.late_mode != "frozen":
            raise ConfigError(
                f"--late-mode {self.late_mode} needs late layers to tune; with --late-layers 0 "
                "the head reads the fused states directly"
            )

    @property
    def selection(self) -> SelectOn:
        return SelectOn.parse(self.select_on)

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

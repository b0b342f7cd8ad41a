"""A cache's size before it is written, the free space where it goes, and stage two's memory.

Everything here follows from the plan alone (the tokenised splits, stored layers, dtype and
geometry), so ``sherl-cache estimate`` and ``extract`` know the size before any forward pass:
token counts are exact, the size on disk applies the lossless ratio measured on real
activations (``benchmarks/codecs.py``), and ``extract`` refuses to start when the disk cannot
hold what is still to be written.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config.train import DEFAULT_MEMORY_BUDGET
from ..errors import CacheError
from ..families import get_family
from ..runtime import SCALE_DTYPE, STORAGE_DTYPES, is_scaled
from ..store.writer import is_url

# Blosc-LZ4 bit-shuffle on MiniLM's activations (benchmarks/estimate_accuracy.py, 2026-11-26:
# 1.149, 1.092, 1.343, 1.021, 1.069); other models' ratios differ by a few per cent.
EXPECTED_RATIO = {
    "float32": 1.15,
    "float16": 1.09,
    "bfloat16": 1.35,
    "int8": 1.02,
    "float8_e4m3": 1.07,
}
# Per-token bytes of the token-axis side arrays: int32 ids, int8 segment ids.
ID_BYTES, TYPE_BYTES = 4, 1
# Parameters of one transformer layer in units of d^2 (attention 4 d^2, a 4x FFN 8 d^2).
LAYER_PARAMS_PER_D2 = 12
HEAD_DIM = 64


@dataclass
class SplitEstimate:
    rows: int
    tokens: int
    raw_bytes: int
    total_bytes: int


@dataclass
class Estimate:
    """What a cache will take; ``to_dict`` is what ``estimate --json`` prints."""

    path: str
    dtype: str
    layers: list[int]
    hidden_size: int
    bytes_per_state: int  # one token of one stored layer
    bytes_per_token: int  # one token across every stored layer, raw
    compression_ratio: float
    raw_bytes: int
    total_bytes: int  # the expected size on disk
    existing_bytes: int  # already at the path (a resumed or complete cache)
    free_bytes: int | None  # None where unknown (object stores)
    splits: dict[str, SplitEstimate] = field(default_factory=dict)
    stage_two: dict[str, Any] = field(default_factory=dict)

    @property
    def needed_bytes(self) -> int:
        return max(0, self.total_bytes - self.existing_bytes)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.splits.values())

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), tokens=self.tokens, needed_bytes=self.needed_bytes)

    def lines(self) -> list[str]:
        free = "unknown" if self.free_bytes is None else size_text(self.free_bytes)
        out = [
            f"estimate   {len(self.layers)} states x {self.hidden_size} x {self.dtype}: "
            f"{self.bytes_per_state} B per token per state, {self.bytes_per_token} B per token",
        ]
        for name, split in self.splits.items():
            out.append(
                f"  {name:<11}{split.rows:>8} rows {split.tokens:>10} tokens  "
                f"~{size_text(split.total_bytes)} on disk"
            )
        out.append(
            f"  total      {size_text(self.raw_bytes)} raw, ~{size_text(self.total_bytes)} on "
            f"disk ({self.compression_ratio:.2f}x); {size_text(self.needed_bytes)} still to "
            f"write, {free} free at {self.path}"
        )
        if self.stage_two:
            two = self.stage_two
            out.append(
                f"  stage two  ~{size_text(two['peak_bytes'])} peak memory for --late-layers "
                f"{two['late_layers']} --late-mode {two['late_mode']} --batch-size "
                f"{two['batch_size']} (rough: weights, optimiser, batch, activations, states)"
            )
        return out


def size_text(n: float) -> str:
    """Bytes as 1.5 KiB, 3.2 GiB."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    step = 0
    while n >= 1024 and step < len(units) - 1:
        n, step = n / 1024, step + 1
    return f"{n:.0f} {units[step]}" if step == 0 else f"{n:.1f} {units[step]}"


def free_space(path: str) -> int | None:
    """Free bytes on the filesystem that will hold ``path`` (its nearest existing parent)."""
    if is_url(path):
        return None
    folder = Path(path).absolute()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def existing_size(path: str) -> int:
    """Bytes already under ``path``: what a resume does not write again."""
    if is_url(path) or not Path(path).is_dir():
        return 0
    return sum(
        os.path.getsize(os.path.join(folder, name))
        for folder, _, files in os.walk(path)
        for name in files
    )


def estimate_plan(plan: Any, stage_two: dict[str, Any] | None = None) -> Estimate:
    """The size of ``plan``'s cache (an ``ExtractPlan``) and, if asked, stage two's memory."""
    hidden, dtype = plan.info.hidden_size, plan.dtype
    state = hidden * STORAGE_DTYPES[dtype].itemsize + (
        SCALE_DTYPE.itemsize if is_scaled(dtype) else 0
    )
    hidden_row = state * len(plan.layers)
    side_row = ID_BYTES
    ratio = EXPECTED_RATIO.get(dtype, 1.0)
    # A seq2seq cache also stores, per example, every candidate target's decoder states.
    decoder_example = 0
    seq2seq = getattr(plan, "seq2seq", None)
    if seq2seq is not None:
        width = max(len(t) for t in seq2seq.target_ids)
        decoder_example = len(seq2seq.target_ids) * width * len(seq2seq.decoder_layers) * state
    splits = {}
    for name, tokens in plan.tokenized.items():
        count = int(tokens.offsets[-1])
        row = side_row + (TYPE_BYTES if tokens.has_token_types else 0)
        # offsets and labels: 8 bytes per example each; side arrays are counted raw.
        per_example = 8 * (2 if tokens.labels is not None else 1)
        examples = len(tokens.input_ids)
        raw = count * (hidden_row + row) + examples * (per_example + decoder_example)
        on_disk = count * (hidden_row / ratio + row) + examples * (
            per_example + decoder_example / ratio
        )
        splits[name] = SplitEstimate(len(tokens.input_ids), count, int(raw), int(on_disk))
    result = Estimate(
        path=plan.path,
        dtype=dtype,
        layers=list(plan.layers),
        hidden_size=hidden,
        bytes_per_state=state,
        bytes_per_token=hidden_row + side_row,
        compression_ratio=ratio,
        raw_bytes=sum(s.raw_bytes for s in splits.values()),
        total_bytes=sum(s.total_bytes for s in splits.values()),
        existing_bytes=existing_size(plan.path),
        free_bytes=free_space(plan.path),
        splits=splits,
    )
    if stage_two is not None:
        result.stage_two = stage_two_memory(plan, **stage_two)
    return result


def check_free_space(estimate: Estimate, ignore: bool) -> None:
    """Refuse, before any forward pass, a cache the disk cannot hold."""
    free = estimate.free_bytes
    if ignore or free is None or estimate.needed_bytes <= free:
        return
    raise CacheError(
        f"the cache needs ~{size_text(estimate.needed_bytes)} but only {size_text(free)} is "
        f"free at {estimate.path}: store fewer states (--layers default), fewer splits "
        "(--splits) or a lossy --dtype, free space, or pass --ignore-free-space"
    )


def stage_two_memory(
    plan: Any,
    late_layers: int = 1,
    late_mode: str = "frozen",
    batch_size: int = 100,
    reduction: int = 8,
    lora_rank: int = 8,
) -> dict[str, Any]:
    """A rough peak of stage two's memory in bytes (float32 training, AdamW).

    Counts the late layers' parameters, the trainable ones' gradients and two Adam moments,
    one padded batch of tapped states and the activations kept for the backward pass. Layer
    sizes are taken as 12 d^2 (the 4x FFN of every supported family), so treat it as a guide
    within about a factor of two, not a measurement (``metrics.json`` has the measured peak).
    """
    d, num_layers = plan.info.hidden_size, plan.info.num_layers
    k = max(1, min(late_layers, num_layers))
    split = num_layers - k
    family = get_family(plan.info.family)
    taps = [t for t in family.default_taps(num_layers, k) if t in plan.layers or t == split]
    width = min(plan.manifest["max_length"], max(_longest(t.input_ids) for t in _labelled(plan)))
    late_params = k * LAYER_PARAMS_PER_D2 * d * d
    fusion_params = len(taps) * 2 * d * max(1, d // reduction) + 2 * d * d // reduction
    trainable = fusion_params + {
        "full": late_params,
        "lora": k * 4 * 2 * d * lora_rank,  # q, k, v, o adapters
    }.get(late_mode, 0)
    tokens = batch_size * width
    batch = tokens * d * 4 * (len(taps) + 1)
    heads = max(1, d // HEAD_DIM)
    # Kept for backward: fusion intermediates per tap, and per late layer ~14 d-wide tensors
    # plus the attention scores and probabilities.
    activations = 4 * (
        tokens * d * 3 * len(taps) + k * (tokens * d * 14 + 2 * heads * tokens * width)
    )
    parameters = 4 * (late_params + fusion_params)
    optimiser = 4 * 3 * trainable
    # The cached states a split holds in host memory (a window under the memory budget).
    train = max(int(t.offsets[-1]) for t in _labelled(plan))
    held = min(
        DEFAULT_MEMORY_BUDGET, train * (len(taps) + 1) * d * STORAGE_DTYPES[plan.dtype].itemsize
    )
    peak = parameters + optimiser + batch + activations + held
    return {
        "late_layers": k,
        "late_mode": late_mode,
        "batch_size": batch_size,
        "taps": taps,
        "tokens_per_batch": tokens,
        "parameters_bytes": parameters,
        "optimiser_bytes": optimiser,
        "batch_bytes": batch,
        "activation_bytes": activations,
        "held_states_bytes": held,
        "peak_bytes": peak,
    }


def _labelled(plan: Any) -> list[Any]:
    splits = [t for t in plan.tokenized.values() if t.labels is not None]
    return splits or list(plan.tokenized.values())


def _longest(sequences: Sequence[Sequence[int]]) -> int:
    return max((len(s) for s in sequences), default=1)

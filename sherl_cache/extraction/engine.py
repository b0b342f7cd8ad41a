"""Stage one's compute: the frozen backbone, and one write unit run through it.

A unit's examples are run in length-sorted batches (little padding) and their hidden states
copied back onto the unit's flat token range, so any process that runs the same unit with the
same batch size produces the same bytes: single-process and distributed caches are identical.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..backbone.frozen import load_backbone
from ..backbone.hub import BackboneInfo
from ..errors import NumericOverflowError
from ..families import get_family
from ..runtime import (
    FLOAT16_MAX,
    SCALE_DTYPE,
    STORAGE_DTYPES,
    compute_dtype,
    is_scaled,
    quantize,
    storage_tensor,
)
from ..store.writer import Unit, UnitRange
from .inputs import TokenizedSplit, unit_batches, unit_examples

InputFilter = Callable[[dict], dict]


@dataclass(frozen=True)
class ExtractionModel:
    """The loaded backbone, where it runs, and which of the batch inputs its forward takes."""

    net: torch.nn.Module
    info: BackboneInfo
    device: torch.device
    input_filter: InputFilter

    def context(
        self, dtype: str, layers: tuple[int, ...], batch_size: int, pad_id: int
    ) -> UnitContext:
        return UnitContext(
            self.net, self.device, dtype, layers, batch_size, pad_id, self.input_filter
        )


@dataclass(frozen=True)
class UnitContext:
    """Everything ``run_unit`` needs besides the unit itself."""

    model: torch.nn.Module
    device: torch.device
    dtype: str  # storage dtype
    layers: tuple[int, ...]
    batch_size: int
    pad_id: int
    input_filter: InputFilter


def load_extraction_model(
    model: str,
    *,
    revision: str | None,
    dtype: str,
    device: torch.device,
    trust_remote_code: bool,
    route: str = "encoder",
) -> ExtractionModel:
    """The frozen backbone in its compute dtype, and a filter dropping inputs it does not take.

    The CPU always computes in float32 and rounds on storage (exact within the storage dtype);
    a GPU computes in the storage dtype.
    """
    net, _, info = load_backbone(
        model,
        revision=revision,
        dtype=compute_dtype(device, dtype),
        device=str(device),
        trust_remote_code=trust_remote_code,
        route=route,
    )
    accepts_types = get_family(info.family).uses_token_type_ids

    def input_filter(inputs: dict) -> dict:
        if accepts_types:
            return inputs
        return {k: v for k, v in inputs.items() if k != "token_type_ids"}

    return ExtractionModel(net, info, device, input_filter)


def run_unit(
    context: UnitContext,
    tokens: TokenizedSplit,
    unit: UnitRange,
    on_batch: Callable[[int], None] | None = None,
) -> Unit:
    """Compute one unit: every example overlapping its token range, in length-sorted batches.

    ``unit``'s range is on ``tokens``' own token axis; ``on_batch`` gets each batch's count of
    the unit's tokens (a progress bar).
    """
    offsets = tokens.offsets
    start, stop = unit.start, unit.stop
    first, last = unit_examples(offsets, start, stop)
    examples = sorted(range(first, last), key=lambda i: -len(tokens.input_ids[i]))
    span = slice(start - offsets[first], stop - offsets[first])
    input_ids = np.concatenate([tokens.input_ids[i] for i in range(first, last)]).astype(np.int32)
    token_types = None
    if tokens.token_type_ids is not None:
        types = np.concatenate([tokens.token_type_ids[i] for i in range(first, last)])
        token_types = types.astype(np.int8)[span]
    buffer: np.ndarray | None = None
    scaled = is_scaled(context.dtype)
    scales = np.ones((len(context.layers), stop - start), SCALE_DTYPE) if scaled else None
    for batch, cpu_inputs in unit_batches(tokens, examples, context.batch_size, context.pad_id):
        stored, stored_scales = _stored_states(context, cpu_inputs, batch, tokens.name)
        if buffer is None:
            shape = (len(context.layers), stop - start, stored[0].shape[-1])
            buffer = np.zeros(shape, dtype=STORAGE_DTYPES[context.dtype])
        for row, i in enumerate(batch):
            lo, hi = max(offsets[i], start), min(offsets[i + 1], stop)
            here, there = slice(lo - start, hi - start), slice(lo - offsets[i], hi - offsets[i])
            for position, values in enumerate(stored):
                buffer[position, here] = values[row, there]
            if scales is not None:
                for position, values in enumerate(stored_scales):
                    scales[position, here] = values[row, there]
        if on_batch is not None:
            on_batch(sum(min(offsets[i + 1], stop) - max(offsets[i], start) for i in batch))
    assert buffer is not None
    return Unit(tokens.name, unit.index, start, stop, buffer, input_ids[span], token_types, scales)


def _stored_states(
    context: UnitContext, cpu_inputs: dict[str, torch.Tensor], batch: list[int], split: str
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """One batch's states per stored layer, (B, T, d) in the storage representation, and for
    lossy dtypes their per-token scales (B, T)."""
    inputs = {key: value.to(context.device) for key, value in cpu_inputs.items()}
    with torch.inference_mode():
        output = context.model(**context.input_filter(inputs), output_hidden_states=True)
        keep = cpu_inputs["attention_mask"].to(context.device).bool()
        stored, scales = [], []
        for layer in context.layers:
            states = output.hidden_states[layer]
            if context.dtype == "float16":
                _check_float16(states, keep, layer, batch, split)
            if is_scaled(context.dtype):
                codes, scale = quantize(states, context.dtype)
                stored.append(codes.cpu().numpy())
                scales.append(scale.cpu().numpy())
            else:
                stored.append(storage_tensor(states, context.dtype).cpu().numpy())
    return stored, scales


def _check_float16(states: torch.Tensor, keep: torch.Tensor, layer: int, batch, split: str) -> None:
    """Refuse values float16 cannot hold (and NaN) in real tokens; padding may hold anything."""
    low, high = torch.aminmax(states)
    if low >= -FLOAT16_MAX and high <= FLOAT16_MAX:  # the common case; NaN fails both tests
        return
    peak = torch.where(keep[..., None], states.abs(), 0).amax(dim=(1, 2))  # (B,)
    bad = ~(peak <= FLOAT16_MAX)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise NumericOverflowError(
            f"hidden-state index {layer} of {split} example {batch[row]} reaches "
            f"{float(peak[row]):.3g}, beyond float16's range: use --dtype bfloat16 "
            "or --dtype float32"
        )

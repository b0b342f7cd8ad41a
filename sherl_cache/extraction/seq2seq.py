"""Stage one for the seq2seq route (``--route seq2seq``): T5 as the SHERL paper runs it.

The encoder side is cached like any other: the text-to-text inputs (``rte sentence1: ...``)
go through extraction's units, the family's seq2seq backbone standing in for the headless
model. The decoder side is what this module adds: for every example, the frozen decoder's
states with *every* candidate target (the task's label words) teacher-forced while it
cross-attends to the frozen encoder's output. Training's loss (cross-entropy on the gold
target's tokens) and rank-classification scoring (the log-likelihood of each candidate) then
both read the cache alone.

The decoder side is written after the encoder units, in blocks of examples (one chunk of every
decoder array), each flagged in ``decoder/done`` once durable, so an interrupted extraction
resumes at the first block not flagged. It runs the encoder again: fusing both passes into one
would save that forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..config.extract import ExtractConfig
from ..data.files import SplitData
from ..data.tasks import TaskSpec, TextToText
from ..errors import ConfigError
from ..families import Family
from ..families.base import Seq2SeqBackbone, teacher_forcing
from ..layers import parse_layer_spec
from ..runtime import STORAGE_DTYPES, is_scaled, pad, storage_tensor
from ..store.cache import DECODER, DecoderLayout, hidden_name, writable
from ..store.writer import fault_point
from .inputs import TokenizedSplit, tokenize_split

__all__ = [
    "Seq2SeqSpec",
    "candidate_targets",
    "fill_decoder",
    "plan_seq2seq",
    "source_split",
]


@dataclass(frozen=True)
class Seq2SeqSpec:
    """What a seq2seq extraction stores besides the encoder states."""

    encoder_taps: tuple[int, ...]
    decoder_taps: tuple[int, ...]
    num_decoder_layers: int
    text_to_text: TextToText
    target_ids: tuple[tuple[int, ...], ...]  # per candidate, EOS included
    start_id: int  # the decoder's first input (T5: the pad id)

    @property
    def decoder_layers(self) -> tuple[int, ...]:
        """Stored decoder indices: the taps and the last block's input (the MTSA's last
        feature)."""
        return tuple(sorted({*self.decoder_taps, self.num_decoder_layers - 1}))

    def manifest_fields(self) -> dict[str, dict[str, Any]]:
        """Additions to the manifest's ``model`` and ``task`` (both part of the cache key)."""
        t2t = self.text_to_text
        return {
            "model": {
                "route": "seq2seq",
                "encoder_taps": list(self.encoder_taps),
                "decoder": {
                    "num_layers": self.num_decoder_layers,
                    "layers": list(self.decoder_layers),
                    "taps": list(self.decoder_taps),
                    "start_token_id": self.start_id,
                    # recorded with the model: a run rebuilt for prediction scores the same ids
                    "target_ids": [list(t) for t in self.target_ids],
                },
            },
            "task": {
                "text_to_text": {
                    "prefix": t2t.prefix,
                    "fields": list(t2t.fields),
                    "targets": list(t2t.targets),
                }
            },
        }


def candidate_targets(tokenizer: Any, targets: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """The token ids of each label word as the reference tokenises targets (EOS appended)."""
    encoded = tokenizer(list(targets), add_special_tokens=True, verbose=False)["input_ids"]
    return tuple(tuple(int(i) for i in ids) for ids in encoded)


def plan_seq2seq(
    config: ExtractConfig,
    task: TaskSpec | None,
    family: Family,
    hf_config: Any,
    tokenizer: Any,
    dtype: str,
) -> Seq2SeqSpec:
    """Check that a seq2seq extraction can run and fix what it stores."""
    if task is None or task.text_to_text is None:
        raise ConfigError(
            "--route seq2seq needs a task with a text-to-text format (the GLUE tasks, "
            "--task NAME); for other data use --route encoder"
        )
    if is_scaled(dtype):
        raise ConfigError(
            f"--dtype {dtype} is not offered with --route seq2seq yet; use bfloat16, float16 "
            "or float32"
        )
    encoder, decoder = family.seq2seq_taps(
        int(hf_config.num_layers), int(hf_config.num_decoder_layers)
    )
    start = getattr(hf_config, "decoder_start_token_id", None)
    return Seq2SeqSpec(
        encoder_taps=tuple(encoder),
        decoder_taps=tuple(decoder),
        num_decoder_layers=int(hf_config.num_decoder_layers),
        text_to_text=task.text_to_text,
        target_ids=candidate_targets(tokenizer, task.text_to_text.targets),
        start_id=int(start if start is not None else family.pad_id(tokenizer)),
    )


def encoder_layers(spec: str, seq2seq: Seq2SeqSpec, num_layers: int) -> tuple[int, ...]:
    """Stored encoder indices: ``default`` is the reference's encoder taps; L (the last
    block's raw output, the MTSA's guide and last feature) and L-1 are always kept."""
    if spec.strip().lower() == "default":
        chosen = set(seq2seq.encoder_taps)
    else:
        chosen = set(parse_layer_spec(spec, num_layers))
    return tuple(sorted(chosen | {num_layers - 1, num_layers}))


def source_split(split: SplitData, t2t: TextToText) -> SplitData:
    """A split's examples as text-to-text inputs (one text per example)."""
    sources = [t2t.source(texts) for texts in zip(*split.texts, strict=True)]
    return replace(split, texts=(sources,))


def tokenize_sources(
    family: Family, tokenizer: Any, split: SplitData, max_length: int, t2t: TextToText
) -> TokenizedSplit:
    """Tokenised text-to-text inputs; the fingerprint stays the raw rows' (what evaluation
    compares with the data it is given)."""
    tokens = tokenize_split(family, tokenizer, source_split(split, t2t), max_length)
    return replace(tokens, fingerprint=split.fingerprint())


def decoder_batch(
    net: Seq2SeqBackbone,
    input_ids: Sequence[Sequence[int]],
    pad_id: int,
    target_ids: Sequence[Sequence[int]],
    start_id: int,
    layers: Sequence[int],
    device: torch.device,
) -> tuple[tuple[Tensor, ...], Tensor, dict[int, Tensor]]:
    """Run one batch through the seq2seq backbone: (encoder states 0..L, input mask, decoder
    states per layer as (B, C, T, d) with padded target positions zeroed).

    Shared by extraction and by on-the-fly features (prediction, the online reference), so
    both compute the decoder side the same way.
    """
    ids, mask = pad([list(i) for i in input_ids], pad_id)
    ids, mask = ids.to(device), mask.to(device)
    states, output = net.encoder_states(ids, mask)
    dec_inputs, _, dec_mask = teacher_forcing(target_ids, start_id)
    batch, candidates = ids.shape[0], dec_inputs.shape[0]
    decoded = net.decoder_states(
        output.repeat_interleave(candidates, 0),
        mask.repeat_interleave(candidates, 0),
        dec_inputs.to(device).repeat(batch, 1),
        dec_mask.to(device).repeat(batch, 1),
    )
    keep = dec_mask.to(device)[None, :, :, None]
    per_layer = {
        layer: decoded[layer].reshape(batch, candidates, dec_inputs.shape[1], -1) * keep
        for layer in layers
    }
    return states, mask, per_layer


def fill_decoder(
    root: Any,
    tokenized: dict[str, TokenizedSplit],
    seq2seq: Seq2SeqSpec,
    layout: DecoderLayout,
    net: Seq2SeqBackbone,
    device: torch.device,
    batch_size: int,
    pad_id: int,
    on_block: Callable[[str, int], None] | None = None,
) -> None:
    """Write every decoder block not yet flagged done, block by block (resumable)."""
    for name, tokens in tokenized.items():
        group = root[name][DECODER]
        done = group["done"]
        flags = done[:]
        arrays = {layer: writable(group[hidden_name(layer)]) for layer in layout.layers}
        count = len(tokens.input_ids)
        for block in np.flatnonzero(flags == 0):
            lo = int(block) * layout.chunk_examples
            hi = min(lo + layout.chunk_examples, count)
            buffers = {
                layer: np.zeros(
                    (hi - lo, layout.candidates, layout.target_tokens, layout.hidden_size),
                    dtype=STORAGE_DTYPES[layout.dtype],
                )
                for layer in layout.layers
            }
            for start in range(lo, hi, batch_size):
                stop = min(start + batch_size, hi)
                with torch.inference_mode():
                    _, _, states = decoder_batch(
                        net,
                        tokens.input_ids[start:stop],
                        pad_id,
                        seq2seq.target_ids,
                        seq2seq.start_id,
                        layout.layers,
                        device,
                    )
                for layer, values in states.items():
                    stored = storage_tensor(values, layout.dtype).cpu().numpy()
                    buffers[layer][start - lo : stop - lo] = stored
            for layer, array in arrays.items():
                array[lo:hi] = buffers[layer]
            fault_point(f"decoder-block-written:{name}:{block}")
            done[int(block)] = 1
            fault_point(f"decoder-block-done:{name}:{block}")
            if on_block is not None:
                on_block(name, hi - lo)

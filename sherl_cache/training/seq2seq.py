"""Stage two of the seq2seq route: SHERL on T5 as the paper runs it, from a cache.

The model (``Seq2SeqSherlModel``) fuses the cached encoder taps (encoder MTSA, a fresh norm:
the side encoder output) and, per candidate target, the cached decoder taps (decoder MTSA: the
input of the last decoder block). The frozen last decoder block cross-attends to the side
encoder output; a fresh norm and the frozen LM head give each target token's log-probability.
Its output is one score per class, the summed log-probability of that class's label words
(rank classification, which equals greedy decoding constrained to the label words), so the
training loop, evaluation and metrics treat it like any classifier: the loss is token
cross-entropy on the gold target, and a regression task (STS-B) maps the best bin back to its
number (``predictions``).

Feature sources mirror ``features``: ``Seq2SeqCachedFeatures`` (the cache) and
``Seq2SeqTextFeatures`` (the frozen backbone on token ids: prediction, and the online
reference the equivalence tests compare the cache against).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..backbone.hub import load_config
from ..backbone.late import build_seq2seq_route
from ..config.train import DEFAULT_MEMORY_BUDGET, TrainConfig
from ..data.tasks import Problem, TaskSpec
from ..errors import CacheMismatchError, ConfigError
from ..extraction.seq2seq import decoder_batch
from ..families import get_family
from ..families.base import Seq2SeqBackbone, teacher_forcing
from ..layers import parse_layer_spec
from ..runtime import STORAGE_DTYPES, from_storage, round_to_storage
from ..store.cache import Cache
from .features import CachedFeatures
from .fusion import MTSAFusion
from .model import checkpoint_layers, fusion_config

__all__ = [
    "Seq2SeqBatch",
    "Seq2SeqCachedFeatures",
    "Seq2SeqSherlModel",
    "Seq2SeqTextFeatures",
    "build_seq2seq_model",
    "rank_mask",
    "cached_source",
    "is_seq2seq",
    "seq2seq_taps",
]


def is_seq2seq(identity: Mapping[str, Any]) -> bool:
    """Whether a backbone identity (a manifest's or run's ``model``) is of the seq2seq route."""
    return identity.get("route", "encoder") == "seq2seq"


@dataclass
class Seq2SeqBatch:
    taps: list[Tensor]  # encoder taps, each (B, S, d)
    last: Tensor  # (B, S, d): the encoder MTSA's last feature (the last block's raw output)
    mask: Tensor  # (B, S)
    decoder_taps: list[Tensor]  # each (B, C, T, d): per candidate target, teacher-forced
    decoder_last: Tensor  # (B, C, T, d): the input of the last decoder block
    labels: Tensor | None


def seq2seq_taps(cache: Cache, config: TrainConfig) -> tuple[int, ...]:
    """The encoder taps of a run on a seq2seq cache (``--tap``; default: the reference's);
    refuses settings the route does not have, naming the flag."""
    model = cache.manifest["model"]
    if config.late_layers != 1:
        raise ConfigError(
            f"--late-layers {config.late_layers}: the seq2seq route's late layer is the last "
            "decoder block alone; use --late-layers 1"
        )
    if config.late_mode != "frozen":
        raise ConfigError(
            f"--late-mode {config.late_mode}: the seq2seq route keeps the last decoder block "
            "frozen, as the reference does; use --late-mode frozen"
        )
    if config.tap == "default":
        taps = tuple(model["encoder_taps"])
    else:
        taps = parse_layer_spec(config.tap, cache.num_layers, flag="--tap")
        if cache.num_layers not in taps:
            taps = (*taps, cache.num_layers)  # the guide: the last block's raw output
    missing = sorted(set(taps) - set(cache.layers))
    if missing:
        raise CacheMismatchError(
            f"cache {cache.path} does not store encoder states {missing} (--tap); it has "
            f"{cache.layers}"
        )
    return tuple(sorted(taps))


def cached_source(
    cache: Cache,
    split: str,
    taps: Sequence[int],
    last: int,
    limit: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> CachedFeatures | Seq2SeqCachedFeatures:
    """The feature source of a cache's split for its route."""
    if is_seq2seq(cache.manifest["model"]):
        return Seq2SeqCachedFeatures(cache, split, taps, limit, memory_budget)
    return CachedFeatures(cache, split, taps, last, limit, memory_budget)


class Seq2SeqCachedFeatures:
    """A seq2seq cache's split: the encoder side through ``CachedFeatures`` (windows under
    the memory budget, the same block shuffle), the decoder side read per example."""

    def __init__(
        self,
        cache: Cache,
        split: str,
        taps: Sequence[int],
        limit: int | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
    ) -> None:
        decoder = cache.manifest["model"]["decoder"]
        last = cache.num_layers  # the encoder MTSA's guide and last feature
        self.encoder = CachedFeatures(cache, split, taps, last, limit, memory_budget)
        self.labels = self.encoder.labels
        self.dtype = cache.dtype
        self.decoder_taps = list(decoder["taps"])
        self.decoder_last = int(decoder["num_layers"]) - 1
        count = len(self.encoder)
        layers = {*self.decoder_taps, self.decoder_last}
        self._arrays = {layer: cache.decoder_array(split, layer) for layer in layers}
        shape = next(iter(self._arrays.values())).shape
        size = count * int(np.prod(shape[1:])) * STORAGE_DTYPES[self.dtype].itemsize
        # The decoder side is small (label words are 1-3 tokens): held when it fits.
        self._held = (
            {layer: array[:count] for layer, array in self._arrays.items()}
            if size * len(layers) <= memory_budget
            else None
        )

    def __len__(self) -> int:
        return len(self.encoder)

    def order(self, generator: torch.Generator) -> np.ndarray:
        return self.encoder.order(generator)

    def lengths(self) -> np.ndarray:
        """Encoder tokens per example (length-aware batching)."""
        return self.encoder.lengths()

    def _decoder(self, layer: int, indices: np.ndarray, device: torch.device) -> Tensor:
        if self._held is not None:
            rows = self._held[layer][indices]
        else:  # one orthogonal read of the sorted rows, then back to the batch's order
            ordered = np.argsort(indices, kind="stable")
            read = self._arrays[layer].get_orthogonal_selection((indices[ordered],))
            rows = np.empty_like(read)
            rows[ordered] = read
        return torch.from_numpy(from_storage(rows, self.dtype)).to(device)

    def batch(self, indices: np.ndarray, device: torch.device) -> Seq2SeqBatch:
        indices = np.asarray(indices)
        encoder = self.encoder.batch(indices, device)
        return Seq2SeqBatch(
            taps=encoder.taps,
            last=encoder.last,
            mask=encoder.mask,
            decoder_taps=[self._decoder(t, indices, device) for t in self.decoder_taps],
            decoder_last=self._decoder(self.decoder_last, indices, device),
            labels=encoder.labels,
        )


class Seq2SeqTextFeatures:
    """A ``FeatureSource`` over token ids: the frozen seq2seq backbone computes both sides.

    States are rounded to ``dtype`` as a cache of that dtype stores them (prediction); with
    ``float32`` nothing is rounded (the online reference of the equivalence tests).
    """

    def __init__(
        self,
        backbone: Seq2SeqBackbone,
        identity: Mapping[str, Any],
        input_ids: Sequence[Sequence[int]],
        taps: Sequence[int],
        dtype: str,
        pad_id: int,
        labels: np.ndarray | None = None,
    ) -> None:
        decoder = identity["decoder"]
        self.backbone, self.input_ids, self.taps = backbone, input_ids, list(taps)
        self.last = int(identity["num_layers"])
        self.decoder_taps = list(decoder["taps"])
        self.decoder_last = int(decoder["num_layers"]) - 1
        self.target_ids = [list(t) for t in decoder["target_ids"]]
        self.start_id = int(decoder["start_token_id"])
        self.dtype, self.pad_id, self.labels = dtype, pad_id, labels

    def __len__(self) -> int:
        return len(self.input_ids)

    def lengths(self) -> np.ndarray:
        return np.array([len(ids) for ids in self.input_ids], dtype=np.int64)

    def batch(self, indices: np.ndarray, device: torch.device) -> Seq2SeqBatch:
        layers = {*self.decoder_taps, self.decoder_last}
        with torch.no_grad():
            states, mask, decoded = decoder_batch(
                self.backbone,
                [self.input_ids[i] for i in indices],
                self.pad_id,
                self.target_ids,
                self.start_id,
                sorted(layers),
                device,
            )
        keep = mask[..., None].float()

        def encoder(layer: int) -> Tensor:
            return round_to_storage(states[layer].float(), self.dtype) * keep

        def decoder(layer: int) -> Tensor:
            return round_to_storage(decoded[layer].float(), self.dtype)

        labels = None if self.labels is None else torch.from_numpy(self.labels[indices])
        return Seq2SeqBatch(
            taps=[encoder(t) for t in self.taps],
            last=encoder(self.last),
            mask=mask,
            decoder_taps=[decoder(t) for t in self.decoder_taps],
            decoder_last=decoder(self.decoder_last),
            labels=None if labels is None else labels.to(device),
        )


class Seq2SeqSherlModel(nn.Module):
    """Encoder MTSA + norm, decoder MTSA, frozen last decoder block + fresh norm + frozen LM
    head. ``forward`` returns (B, C, T) log-probabilities of each candidate's target tokens
    (0 at padding); ``loss`` and ``predictions`` reduce them."""

    # Parameter counts take the whole checkpoint as the backbone (``parameter_counts``).
    uses_whole_checkpoint = True

    def __init__(
        self,
        encoder_fusion: MTSAFusion,
        decoder_fusion: MTSAFusion,
        late: nn.Module,
        encoder_norm: nn.Module,
        decoder_norm: nn.Module,
        dropout: float,
        target_ids: Sequence[Sequence[int]],
        start_id: int,
        task: TaskSpec,
    ) -> None:
        super().__init__()
        self.encoder_fusion, self.decoder_fusion = encoder_fusion, decoder_fusion
        self.encoder_norm, self.decoder_norm = encoder_norm, decoder_norm
        self.late = late  # frozen: its parameters never train (nor are saved)
        self.dropout = nn.Dropout(dropout)  # the reference's, after each fresh norm
        _, ids, mask = teacher_forcing(target_ids, start_id)
        self.register_buffer("target_ids", ids, persistent=False)
        self.register_buffer("target_mask", mask, persistent=False)
        self.register_buffer("rank_mask", rank_mask(target_ids, mask), persistent=False)
        self.regression = task.problem == Problem.REGRESSION
        t2t = task.text_to_text
        assert t2t is not None
        self.text_to_text = t2t
        values = torch.tensor(t2t.values if self.regression else [0.0], dtype=torch.float32)
        self.register_buffer("values", values, persistent=False)
        self.late_bf16 = False  # set by ``training.loop.place``, as for SherlModel

    def forward(self, batch: Seq2SeqBatch) -> Tensor:
        encoder = self.encoder_fusion(batch.taps, batch.last, batch.mask)
        encoder = self.dropout(self.encoder_norm(encoder))
        size, candidates, length, width = batch.decoder_last.shape
        mask = self.target_mask[None].expand(size, -1, -1).reshape(size * candidates, length)
        fused = self.decoder_fusion(
            [t.reshape(-1, length, width) for t in batch.decoder_taps],
            batch.decoder_last.reshape(-1, length, width),
            mask,
        )
        cross = encoder.repeat_interleave(candidates, 0)
        cross_mask = batch.mask.repeat_interleave(candidates, 0)
        with torch.autocast(fused.device.type, dtype=torch.bfloat16, enabled=self.late_bf16):
            hidden = self.late(fused, mask, cross, cross_mask)
        hidden = self.dropout(self.decoder_norm(hidden.float()))
        with torch.autocast(fused.device.type, dtype=torch.bfloat16, enabled=self.late_bf16):
            logits = self.late.logits(hidden)
        logits = logits.float().reshape(size, candidates, length, -1)
        target = self.target_ids[None, :, :, None].expand(size, -1, -1, 1)
        token = logits.gather(-1, target).squeeze(-1) - logits.logsumexp(-1)
        return token * self.target_mask

    def gold(self, labels: Tensor) -> Tensor:
        """Class index of each label: the bin of a regression score."""
        if not self.regression:
            return labels.long()
        return torch.tensor(
            [self.text_to_text.bin_of(v) for v in labels.tolist()], device=labels.device
        )

    def loss(self, outputs: Tensor, labels: Tensor) -> Tensor:
        """Token cross-entropy on the gold targets, end token included (mean over the batch's
        target tokens, as the reference's ``CrossEntropyLoss``)."""
        gold = self.gold(labels)
        picked = outputs[torch.arange(len(gold), device=gold.device), gold].sum(-1)
        tokens = self.target_mask.sum(1)[gold].to(outputs.dtype)
        return -picked.sum() / tokens.sum()

    def scores(self, outputs: Tensor) -> Tensor:
        """(N, C) rank-classification scores: the summed log-probabilities of each label's
        words (the end token every target shares is left out: it decides nothing)."""
        return (outputs * self.rank_mask).sum(-1)

    def predictions(self, outputs: Tensor) -> Tensor:
        """What metrics read: class scores, or a regression task's best bin as a number."""
        scores = self.scores(outputs)
        if not self.regression:
            return scores
        return self.values.to(outputs.device)[scores.argmax(-1)]


def rank_mask(target_ids: Sequence[Sequence[int]], mask: Tensor) -> Tensor:
    """The target positions ranking reads: all but the last token when every target ends with
    the same one (the tokenizer's end token)."""
    ranked = mask.clone()
    if len({tuple(t[-1:]) for t in target_ids}) == 1:
        for row, target in enumerate(target_ids):
            ranked[row, len(target) - 1] = 0
    return ranked


def build_seq2seq_model(
    config: TrainConfig,
    identity: Mapping[str, Any],
    task: TaskSpec,
    taps: Sequence[int],
    model_path: str,
) -> Seq2SeqSherlModel:
    """A freshly initialised (seeded) seq2seq model; the frozen route read from
    ``model_path``. Fusions are built as ``--fusion-variant``/``--fusion-dropout`` say, by
    default the family's reference module (T5: gated, N(0, 0.01), no dropout inside)."""
    if task.text_to_text is None:
        raise ConfigError(f"task {task.name} has no text-to-text format for the seq2seq route")
    if config.tap_dropout:
        raise ConfigError(
            "--tap-dropout is built for encoder-route caches only (extract --route encoder); "
            "leave it at 0 on a seq2seq cache"
        )
    family = get_family(identity["family"])
    hf_config = load_config(Path(model_path), model_path)
    decoder = identity["decoder"]
    torch.manual_seed(config.seed)
    width = int(identity["hidden_size"])

    def fusion(num_taps: int) -> MTSAFusion:
        return MTSAFusion(fusion_config(config, family, width, num_taps))

    encoder_fusion = fusion(len(taps))
    decoder_fusion = fusion(len(decoder["taps"]))
    late = build_seq2seq_route(model_path).requires_grad_(False)
    if config.late_checkpointing:
        checkpoint_layers(late)
    return Seq2SeqSherlModel(
        encoder_fusion,
        decoder_fusion,
        late,
        family.side_norm(hf_config),
        family.side_norm(hf_config),
        float(getattr(hf_config, "dropout_rate", 0.0)),
        decoder["target_ids"],
        int(decoder["start_token_id"]),
        task,
    )

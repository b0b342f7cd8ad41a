"""Feature sources: what the SHERL model reads, from the cache or from the frozen backbone.

``CachedFeatures`` reads the cache; ``OnlineFeatures`` runs the frozen backbone in the loop;
``TextFeatures`` runs it on new text for prediction. All give the same tensors for the same
examples, so the cache changes what training costs, never what it computes; the equivalence
tests pin that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from ..backbone.frozen import run_lower_layers
from ..config.train import DEFAULT_MEMORY_BUDGET
from ..runtime import STORAGE_DTYPES, from_storage, pad, round_to_storage
from ..store.cache import Cache
from .discovery import family_of_cache


@dataclass
class Batch:
    # each (B, T, d): float32, or a float16/bfloat16 cache's own dtype (``CachedFeatures``)
    taps: list[Tensor]
    last: Tensor  # (B, T, d), as the taps: the frozen input of the first late layer
    mask: Tensor  # (B, T) 1/0
    labels: Tensor | None


class FeatureSource(Protocol):
    def __len__(self) -> int: ...

    def batch(self, indices: np.ndarray, device: torch.device) -> Batch: ...


def _labels(labels: np.ndarray | None, indices: np.ndarray, device: torch.device) -> Tensor | None:
    return None if labels is None else torch.from_numpy(labels[indices]).to(device)


class CachedFeatures:
    """Padded batches of one split's cached states, read within a host-memory budget.

    A split that fits the budget is read once and kept. A larger one is cut into *windows* of
    consecutive examples that each fit; an epoch visits the windows in random order and the
    examples of each window in random order (a block shuffle), so only one window is held at a
    time and reads stay sequential. Host memory thus stays bounded whatever the data size.

    A float16/bfloat16 cache's states are delivered in that dtype (``keep_storage_dtype``):
    every value is exact in float32, and the fusion computes in float32 from them without
    keeping a float32 copy (``storage_linear``). Float32 and lossy caches give float32.
    """

    def __init__(
        self,
        cache: Cache,
        split: str,
        taps: Sequence[int],
        last: int,
        limit: int | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        keep_storage_dtype: bool = True,
    ):
        self.taps, self.last = list(taps), last
        self.dtype = cache.dtype
        self.keep_storage_dtype = keep_storage_dtype
        offsets = cache.offsets(split)
        count = len(offsets) - 1 if limit is None else min(limit, len(offsets) - 1)
        self.offsets = offsets[: count + 1]
        self.labels = cache.labels(split)[:count] if cache.labelled(split) else None
        self._arrays = {layer: cache.layer_array(split, layer) for layer in {*self.taps, last}}
        # Lossy caches are decoded on read: codes times their per-token scales.
        self._scales = {layer: cache.scale_array(split, layer) for layer in self._arrays}
        row_bytes = len(self._arrays) * cache.hidden_size * STORAGE_DTYPES[self.dtype].itemsize
        self.windows = _windows(self.offsets, max(1, memory_budget // row_bytes))
        self._window: int | None = None
        self._held: dict[int, np.ndarray] = {}
        self._held_scales: dict[int, np.ndarray | None] = {}

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        """Tokens per example, for length-aware batching (``training.batching``)."""
        return np.diff(self.offsets)

    def order(self, generator: torch.Generator) -> np.ndarray:
        """The epoch's example order: a plain permutation when one window holds the split."""
        if len(self.windows) == 1:
            return torch.randperm(len(self), generator=generator).numpy()
        visits = torch.randperm(len(self.windows), generator=generator).tolist()
        return np.concatenate(
            [
                first + torch.randperm(end - first, generator=generator).numpy()
                for first, end in (self.windows[w] for w in visits)
            ]
        )

    def _hold(self, window: int) -> None:
        if window != self._window:
            self._held = {}  # drop the previous window before reading the next
            first, end = self.windows[window]
            span = slice(int(self.offsets[first]), int(self.offsets[end]))
            self._held = {layer: array[span] for layer, array in self._arrays.items()}
            self._held_scales = {
                layer: None if array is None else array[span]
                for layer, array in self._scales.items()
            }
            self._window = window

    def batch(self, indices: np.ndarray, device: torch.device) -> Batch:
        starts = self.offsets[indices]
        lengths = self.offsets[indices + 1] - starts
        width = int(lengths.max())
        positions = np.arange(width)[None, :]
        mask = positions < lengths[:, None]
        window_of = np.searchsorted([first for first, _ in self.windows], indices, "right") - 1
        self._hold(int(window_of[0]))
        inside = window_of == self._window
        base = int(self.offsets[self.windows[self._window][0]])
        gather = np.where(mask, starts[:, None] - base + positions, starts[:, None] - base)
        where = np.where(inside[:, None], gather, 0)
        padding = ~mask

        def read(held: np.ndarray, array) -> np.ndarray:
            rows = held[where]
            for row in np.flatnonzero(~inside):  # a batch crossing a window edge: read directly
                start, n = int(starts[row]), int(lengths[row])
                rows[row, :n] = array[start : start + n]
            return rows

        decoded: dict[int, Tensor] = {}

        def states(layer: int) -> Tensor:
            # Decoded once per batch (the split layer is often a tap too), from the stored
            # dtype; padding is zeroed in that dtype (all-zero bits decode to 0 in every
            # storage dtype), so no float32 copy is made beyond the one returned, and none
            # at all for float16/bfloat16 kept in their dtype.
            if layer not in decoded:
                rows = read(self._held[layer], self._arrays[layer])
                rows[padding] = 0
                if self.keep_storage_dtype and self.dtype in HALF_STORAGE:
                    decoded[layer] = half_tensor(rows, self.dtype).to(device)
                    return decoded[layer]
                held_scales = self._held_scales[layer]
                scales = None if held_scales is None else read(held_scales, self._scales[layer])
                decoded[layer] = torch.from_numpy(from_storage(rows, self.dtype, scales)).to(device)
            return decoded[layer]

        return Batch(
            taps=[states(layer) for layer in self.taps],
            last=states(self.last),
            mask=torch.from_numpy(mask.astype(np.int64)).to(device),
            labels=_labels(self.labels, indices, device),
        )


HALF_STORAGE = ("float16", "bfloat16")


def half_tensor(rows: np.ndarray, dtype: str) -> Tensor:
    """Stored float16/bfloat16 ``rows`` as a torch tensor of that dtype, sharing their memory
    (bfloat16 is stored as its raw bits in uint16)."""
    if dtype == "bfloat16":
        return torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(rows)


def _windows(offsets: np.ndarray, max_tokens: int) -> list[tuple[int, int]]:
    """Consecutive example ranges of at most ``max_tokens`` tokens (at least one example)."""
    windows, first = [], 0
    count = len(offsets) - 1
    while first < count:
        end = int(np.searchsorted(offsets, offsets[first] + max_tokens, "right")) - 1
        end = min(max(end, first + 1), count)
        windows.append((first, end))
        first = end
    return windows or [(0, 0)]


class TextFeatures:
    """A ``FeatureSource`` over token ids: the frozen backbone runs up to the split.

    States are rounded to ``dtype`` as a cache of that dtype stores them, so features computed
    on the fly equal the cached ones the model was trained on. ``token_type_ids`` are given
    only for families whose forward takes them (``Family.uses_token_type_ids``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        input_ids: Sequence[Sequence[int]],
        token_type_ids: Sequence[Sequence[int]] | None,
        taps: Sequence[int],
        last: int,
        dtype: str,
        pad_id: int,
        labels: np.ndarray | None = None,
    ) -> None:
        self.backbone, self.taps, self.last, self.dtype = backbone, list(taps), last, dtype
        self.input_ids, self.pad_id = input_ids, pad_id
        self.token_type_ids = token_type_ids
        self.labels = labels

    def __len__(self) -> int:
        return len(self.input_ids)

    def lengths(self) -> np.ndarray:
        """Tokens per example, for length-aware batching (``training.batching``)."""
        return np.array([len(ids) for ids in self.input_ids], dtype=np.int64)

    def hidden_states(self, ids: Tensor, mask: Tensor, types: Tensor | None) -> Sequence[Tensor]:
        return run_lower_layers(self.backbone, ids, mask, self.last, types)

    def batch(self, indices: np.ndarray, device: torch.device) -> Batch:
        ids, mask = pad([self.input_ids[i] for i in indices], self.pad_id)
        types = None
        if self.token_type_ids is not None:
            types = pad([self.token_type_ids[i] for i in indices], 0)[0].to(device)
        mask = mask.to(device)
        with torch.no_grad():
            states = self.hidden_states(ids.to(device), mask, types)
        keep = mask[..., None].float()

        def feature(layer: int) -> Tensor:
            return round_to_storage(states[layer].float(), self.dtype) * keep

        return Batch(
            [feature(t) for t in self.taps],
            feature(self.last),
            mask,
            _labels(self.labels, indices, device),
        )


class OnlineFeatures(TextFeatures):
    """A split's cached token ids run through the whole frozen backbone in the loop (eval mode,
    no grad), states unrounded: the reference ``CachedFeatures`` must match, and the baseline
    of the benchmarks."""

    def __init__(
        self,
        backbone: nn.Module,
        cache: Cache,
        split: str,
        taps: Sequence[int],
        last: int,
        limit: int | None = None,
    ):
        available = cache.num_examples(split)
        count = available if limit is None else min(limit, available)
        types = None
        if family_of_cache(cache).uses_token_type_ids:
            types = [cache.token_type_ids(split, i) for i in range(count)]
            types = None if types and types[0] is None else types
        pad_id = getattr(backbone.config, "pad_token_id", None)
        super().__init__(
            backbone,
            [cache.input_ids(split, i) for i in range(count)],
            types,
            taps,
            last,
            "float32",
            0 if pad_id is None else pad_id,
            cache.labels(split)[:count] if cache.labelled(split) else None,
        )

    def hidden_states(self, ids: Tensor, mask: Tensor, types: Tensor | None) -> Sequence[Tensor]:
        inputs = {"input_ids": ids, "attention_mask": mask}
        if types is not None:
            inputs["token_type_ids"] = types
        return self.backbone(**inputs, output_hidden_states=True).hidden_states

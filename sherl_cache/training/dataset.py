"""A ``torch.utils.data.Dataset`` over one cache split, for users' own training loops.

Items are decoded like every other reader (bfloat16 bits, lossy codes times their scales), so a
user's loop sees the same float32 states ``train`` does. The cache is opened lazily in each
process, so the dataset travels to ``DataLoader`` workers as a path, not as open stores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..store.cache import Cache, open_cache


class CacheDataset(Dataset):
    """Example ``i`` of ``split``: ``input_ids`` (T,), ``hidden`` {layer: (T, d) float32} and
    ``label`` when the split has labels. ``layers`` defaults to every stored state."""

    def __init__(self, path: str, split: str, layers: Sequence[int] | None = None):
        self.path, self.split = str(path), split
        cache = open_cache(self.path)
        self.layers = list(cache.layers if layers is None else layers)
        for layer in self.layers:
            cache.layer_array(split, layer)  # a missing split or layer fails here, not in a worker
        self._length = cache.num_examples(split)
        self._cache: Cache | None = None
        self._labels: np.ndarray | None = None

    def __len__(self) -> int:
        return self._length

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__, _cache=None, _labels=None)

    def _open(self) -> Cache:
        if self._cache is None:
            self._cache = open_cache(self.path)
            if self._cache.labelled(self.split):
                self._labels = self._cache.labels(self.split)
        return self._cache

    def __getitem__(self, i: int) -> dict[str, Any]:
        cache = self._open()
        item: dict[str, Any] = {
            "input_ids": torch.from_numpy(cache.input_ids(self.split, i).astype(np.int64)),
            "hidden": {
                layer: torch.from_numpy(cache.hidden(self.split, layer, i)) for layer in self.layers
            },
        }
        if self._labels is not None:
            item["label"] = torch.as_tensor(self._labels[i])
        return item

    @staticmethod
    def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Right-padded batch: ``hidden`` {layer: (B, T, d)}, ``attention_mask`` (B, T)."""
        width = max(len(item["input_ids"]) for item in items)
        mask = torch.zeros(len(items), width, dtype=torch.long)
        ids = torch.zeros(len(items), width, dtype=torch.long)
        layers = list(items[0]["hidden"])
        d = items[0]["hidden"][layers[0]].shape[-1] if layers else 0
        hidden = {layer: torch.zeros(len(items), width, d) for layer in layers}
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            mask[row, :n], ids[row, :n] = 1, item["input_ids"]
            for layer in layers:
                hidden[layer][row, :n] = item["hidden"][layer]
        batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "hidden": hidden}
        if "label" in items[0]:
            batch["label"] = torch.stack([item["label"] for item in items])
        return batch

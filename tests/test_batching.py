"""Epoch batch orders: every example once per epoch, seeded, length-bucketed, window-aware."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sherl_cache.errors import ConfigError
from sherl_cache.store.cache import open_cache
from sherl_cache.training.batching import eval_batches, restore_order, train_batches
from sherl_cache.training.features import CachedFeatures


class Lengths:
    """A source stand-in: only what batching reads (length, lengths, optional windows)."""

    def __init__(self, lengths: np.ndarray, windows: list[tuple[int, int]] | None = None):
        self._lengths, self.windows = np.asarray(lengths), windows

    def __len__(self) -> int:
        return len(self._lengths)

    def lengths(self) -> np.ndarray:
        return self._lengths


def padding(batches, lengths) -> int:
    return sum(int(lengths[b].max()) * len(b) - int(lengths[b].sum()) for b in batches)


def window_sizes(count: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    cuts = np.sort(rng.choice(np.arange(1, count), size=min(4, count - 1), replace=False))
    edges = [0, *cuts.tolist(), count]
    return list(zip(edges[:-1], edges[1:], strict=True))


@pytest.mark.parametrize("batching", ["random", "bucketed"])
@pytest.mark.parametrize(("count", "batch_size"), [(1, 4), (7, 3), (100, 8), (1234, 32)])
@pytest.mark.parametrize("windowed", [False, True])
def test_every_example_exactly_once_per_epoch(batching, count, batch_size, windowed):
    rng = np.random.default_rng(count)
    lengths = rng.integers(3, 120, size=count)
    windows = window_sizes(count, rng) if windowed and count > 1 else None
    source = Lengths(lengths, windows)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):  # several epochs from one generator, as fit draws them
        batches = train_batches(source, batch_size, generator, batching)
        seen = np.concatenate(batches)
        assert np.array_equal(np.sort(seen), np.arange(count))
        assert all(1 <= len(b) <= batch_size for b in batches)
        if windows:  # a batch never crosses a window edge, so one window is held at a time
            starts = [first for first, _ in windows]
            for b in batches if batching == "bucketed" else []:
                assert len(set(np.searchsorted(starts, b, "right"))) == 1
    evaluation = eval_batches(source, batch_size, batching)
    assert np.array_equal(np.sort(np.concatenate(evaluation)), np.arange(count))


def test_bucketed_is_seeded_shuffled_and_pads_less():
    lengths = np.random.default_rng(1).integers(10, 110, size=3000)
    source = Lengths(lengths)

    def epochs(seed: int) -> list[list[np.ndarray]]:
        generator = torch.Generator().manual_seed(seed)
        return [train_batches(source, 100, generator, "bucketed") for _ in range(2)]

    first, again, other = epochs(0), epochs(0), epochs(1)
    assert all(
        np.array_equal(a, b)
        for e, f in zip(first, again, strict=True)
        for a, b in zip(e, f, strict=True)
    )
    # the next epoch and another seed give other batches, in another order
    assert not np.array_equal(np.concatenate(first[0]), np.concatenate(first[1]))
    assert not np.array_equal(np.concatenate(first[0]), np.concatenate(other[0]))
    widths = [int(lengths[b].max()) for b in first[0]]
    assert widths != sorted(widths) and widths != sorted(widths, reverse=True)
    randomly = train_batches(source, 100, torch.Generator().manual_seed(0), "random")
    assert padding(first[0], lengths) < padding(randomly, lengths) / 4


def test_random_keeps_the_loops_previous_order():
    """``random`` draws what fit drew before batching existed: seeded runs keep their numbers."""
    source = Lengths(np.ones(50, dtype=int))
    generator, reference = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(2):
        permutation = torch.randperm(50, generator=reference).numpy()
        expected = [permutation[s : s + 8] for s in range(0, 50, 8)]
        got = train_batches(source, 8, generator, "random")
        assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))


def test_eval_order_is_restored():
    lengths = np.array([5, 1, 9, 3, 7, 2])
    batches = eval_batches(Lengths(lengths), 4, "bucketed")
    assert [lengths[b].tolist() for b in batches] == [[1, 2, 3, 5], [7, 9]]
    outputs = np.concatenate(batches).astype(float)[:, None]  # each row holds its own index
    assert restore_order(outputs, batches)[:, 0].tolist() == list(range(6))


def test_bucketed_needs_lengths():
    class NoLengths:
        def __len__(self) -> int:
            return 3

    with pytest.raises(ConfigError, match="--batching bucketed needs"):
        train_batches(NoLengths(), 2, torch.Generator(), "bucketed")
    # evaluation falls back to split order instead
    assert [b.tolist() for b in eval_batches(NoLengths(), 2, "bucketed")] == [[0, 1], [2]]


def test_windowed_cache_source(bert_cache):
    """Over a cache cut into windows, bucketed batches stay inside a window and cover the split."""
    cache = open_cache(bert_cache)
    whole = CachedFeatures(cache, "train", [0, 1], 1)
    row_bytes = 2 * cache.hidden_size * 4
    windowed = CachedFeatures(cache, "train", [0, 1], 1, memory_budget=row_bytes * 60)
    assert len(windowed.windows) > 1
    assert np.array_equal(windowed.lengths(), whole.lengths())
    batches = train_batches(windowed, 4, torch.Generator().manual_seed(0), "bucketed")
    assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(len(whole)))
    cpu = torch.device("cpu")
    for indices in batches:
        a, b = windowed.batch(indices, cpu), whole.batch(indices, cpu)
        assert torch.equal(a.last, b.last) and torch.equal(a.mask, b.mask)
        assert a.mask.shape[1] == int(whole.lengths()[indices].max())

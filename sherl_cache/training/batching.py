"""Which examples each batch holds, and in which order an epoch's batches come (``--batching``).

A batch is padded to its longest member, so on data of mixed length a random batch spends much
of its compute on padding (MRPC: pairs average ~53 tokens, a random batch of 100 pads to ~85).

- ``random``: a seeded permutation cut into consecutive batches; over a windowed source
  (``CachedFeatures`` larger than its memory budget) the permutation is the source's block
  shuffle (windows in random order, examples shuffled inside each window).
- ``bucketed``: examples of similar length share a batch. Per window, the examples are shuffled,
  cut into pools of ``POOL_BATCHES`` batches, each pool sorted by length and cut into batches;
  then the window's batches are shuffled. Batch *order* is therefore as random as before, and
  batch *membership* is random among examples of about the same length (HF Trainer's
  ``group_by_length`` sampler works the same way). Batches never cross a window, so the windowed
  reader still holds one window at a time.

Both are driven by one ``torch.Generator`` seeded once per run, so a seed repeats its batches.
``random`` draws exactly what the loop drew before this module existed, so seeded runs with
the default keep their numbers.

Evaluation never shuffles: ``random`` keeps the split's order; ``bucketed`` batches examples
sorted by length and callers put the outputs back in split order (``restore_order``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from ..config.train import Batching
from ..errors import ConfigError

__all__ = ["POOL_BATCHES", "Batching", "eval_batches", "restore_order", "train_batches"]

# Batches per sorting pool: large enough that a pool's batches are of nearly equal length,
# small enough that long and short examples of the whole split still mix across pools.
POOL_BATCHES = 50


class _Sized(Protocol):
    def __len__(self) -> int: ...


def _lengths(source: _Sized) -> np.ndarray:
    lengths = getattr(source, "lengths", None)
    if lengths is None:
        raise ConfigError(
            f"--batching bucketed needs the examples' lengths, which {type(source).__name__} "
            "does not give; use --batching random"
        )
    return np.asarray(lengths() if callable(lengths) else lengths)


def _windows(source: _Sized) -> Sequence[tuple[int, int]]:
    return getattr(source, "windows", None) or [(0, len(source))]


def train_batches(
    source: _Sized, batch_size: int, generator: torch.Generator, batching: Batching = "random"
) -> list[np.ndarray]:
    """One epoch's training batches (arrays of example indices), every example exactly once."""
    if batching == "random":
        order = getattr(source, "order", None)
        permutation = (
            order(generator)
            if order is not None
            else torch.randperm(len(source), generator=generator).numpy()
        )
        return [
            permutation[start : start + batch_size] for start in range(0, len(source), batch_size)
        ]
    if batching != "bucketed":
        raise ConfigError(f"--batching must be random or bucketed, got {batching!r}")
    lengths, windows = _lengths(source), _windows(source)
    visits = torch.randperm(len(windows), generator=generator).tolist()
    batches: list[np.ndarray] = []
    for window in visits:
        first, end = windows[window]
        batches += _bucket(first, end, lengths, batch_size, generator)
    return batches


def _bucket(
    first: int, end: int, lengths: np.ndarray, batch_size: int, generator: torch.Generator
) -> list[np.ndarray]:
    """Length-bucketed batches of examples ``first..end-1``, in random order."""
    shuffled = first + torch.randperm(end - first, generator=generator).numpy()
    pool_size = batch_size * POOL_BATCHES
    batches = []
    for start in range(0, len(shuffled), pool_size):
        pool = shuffled[start : start + pool_size]
        # stable: examples of equal length keep their shuffled order, so membership stays random
        pool = pool[np.argsort(-lengths[pool], kind="stable")]
        batches += [pool[i : i + batch_size] for i in range(0, len(pool), batch_size)]
    visit = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in visit]


def eval_batches(
    source: _Sized, batch_size: int, batching: Batching = "random"
) -> list[np.ndarray]:
    """Evaluation batches: split order, or (bucketed) sorted by length within each window."""
    count = len(source)
    if batching == "random" or getattr(source, "lengths", None) is None:
        # without lengths, split order: evaluation results do not depend on batching
        return [np.arange(s, min(s + batch_size, count)) for s in range(0, count, batch_size)]
    lengths = _lengths(source)
    batches = []
    for first, end in _windows(source):
        span = np.arange(first, end)
        span = span[np.argsort(lengths[first:end], kind="stable")]
        batches += [span[i : i + batch_size] for i in range(0, len(span), batch_size)]
    return batches


def restore_order(outputs: np.ndarray, batches: Sequence[np.ndarray]) -> np.ndarray:
    """Rows of ``outputs`` (concatenated in batch order) put back in split order."""
    if not batches:
        return outputs
    restored = np.empty_like(outputs)
    restored[np.concatenate(batches)] = outputs
    return restored

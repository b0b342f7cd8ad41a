"""Where and in what precision work runs: device choice, storage dtypes, padding.

Every stage shares these so that a cache written on one path (single process, dask worker)
reads back identically on another (training, prediction, verify). Torch is imported lazily:
light commands (``info``, ``report``, ``--help``) import this module without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

Device = Literal["auto", "cpu", "cuda"]
DEVICES: tuple[str, ...] = get_args(Device)
StorageDtype = Literal["float32", "float16", "bfloat16"]
STORAGE_DTYPE_NAMES: tuple[str, ...] = get_args(StorageDtype)
# How each storage dtype is held in numpy and Zarr: bfloat16 is not a Zarr dtype, so its raw
# bits are stored as uint16 and the dtype is recorded in the manifest.
STORAGE_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(np.uint16),
}
FLOAT16_MAX = 65504.0
# Recomputation tolerance: |cached - recomputed| <= RTOL * (|recomputed| + rms(recomputed)).
# Scaling by the layer's RMS keeps it meaningful for unnormalised residual streams (T5), and
# the factors leave room for GPU half-precision compute against a CPU float32 recomputation.
RTOL = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 6e-2}


def check_device(device: str, flag: str = "--device") -> str:
    if device not in DEVICES:
        raise ConfigError(f"unknown device {device!r} ({flag}): choose {', '.join(DEVICES)}")
    return device


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is a one-line error."""
    import torch

    check_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(device)


def compute_dtype(device: torch.device, storage: str) -> torch.dtype:
    """The CPU computes in float32 and rounds on storage (exact within the storage dtype); a
    GPU computes in the storage dtype."""
    import torch

    if device.type == "cpu" or storage == "float32":
        return torch.float32
    return getattr(torch, storage)


# --- storage representation -------------------------------------------------------------------


def to_storage(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 array -> the stored representation (bfloat16 as round-to-nearest-even bits)."""
    if dtype == "bfloat16":
        bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
        rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
        return ((bits + rounding) >> 16).astype(np.uint16)
    return values.astype(STORAGE_DTYPES[dtype], copy=False)


def from_storage(values: np.ndarray, dtype: str) -> np.ndarray:
    """Stored representation -> float32."""
    if dtype == "bfloat16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32, copy=False)


def storage_tensor(hidden: torch.Tensor, dtype: str) -> torch.Tensor:
    """A tensor in the stored representation, ready for ``.numpy()`` (bfloat16 as int16 bits)."""
    import torch

    if dtype == "bfloat16":
        return hidden.to(torch.bfloat16).view(torch.int16)
    return hidden.to(getattr(torch, dtype))


def round_to_storage(states: torch.Tensor, dtype: str) -> torch.Tensor:
    """float32 states rounded as the cache stores them (round to nearest even), kept float32:
    features computed on the fly then equal the cached ones."""
    if dtype == "float32":
        return states
    import torch

    return states.to(getattr(torch, dtype)).float()


# --- batches -----------------------------------------------------------------------------------


def pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) long tensor of ``sequences`` and its 1/0 mask of real tokens.

    Padding is always on the right and always masked, so the pad id never changes a result;
    it is still the tokenizer's own, so nothing out of vocabulary is ever embedded.
    """
    import torch

    width = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, values in enumerate(sequences):
        n = len(values)
        ids[row, :n] = torch.as_tensor(np.asarray(values, dtype=np.int64))
        mask[row, :n] = 1
    return ids, mask

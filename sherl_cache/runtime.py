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
StorageDtype = Literal["float32", "float16", "bfloat16", "int8", "float8_e4m3"]
STORAGE_DTYPE_NAMES: tuple[str, ...] = get_args(StorageDtype)
# How each storage dtype is held in numpy and Zarr: bfloat16 and float8 are not Zarr dtypes, so
# their raw bits are stored as unsigned integers and the dtype is recorded in the manifest.
STORAGE_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(np.uint16),
    "int8": np.dtype(np.int8),
    "float8_e4m3": np.dtype(np.uint8),
}
FLOAT16_MAX = 65504.0
# Lossy dtypes store each token's values divided by a per-token scale (its absolute maximum over
# the hidden axis / the code's largest value), rounded to nearest; the float32 scale is stored
# beside them (``scale_NNN``). Error bound per value x with scale s: int8 |e| <= s/2; float8
# e4m3 (OCP "fn": 3 mantissa bits, largest 448) |e| <= |x|/16 + s/1024 (half a step, normal
# or subnormal).
SCALED_MAX = {"int8": 127.0, "float8_e4m3": 448.0}
SCALE_DTYPE = np.dtype(np.float32)
# Recomputation tolerance: |cached - recomputed| <= RTOL * (|recomputed| + rms(recomputed))
# (+ the error bound above for lossy dtypes). Scaling by the layer's RMS keeps it meaningful for
# unnormalised residual streams (T5), and the factors leave room for GPU half-precision compute
# against a CPU float32 recomputation; lossy dtypes are computed in float32 everywhere.
RTOL = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 6e-2, "int8": 1e-3, "float8_e4m3": 1e-3}


def is_scaled(dtype: str) -> bool:
    """Whether ``dtype`` is lossy, stored as codes and a per-token scale."""
    return dtype in SCALED_MAX


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

    if device.type == "cpu" or storage == "float32" or is_scaled(storage):
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


def from_storage(values: np.ndarray, dtype: str, scales: np.ndarray | None = None) -> np.ndarray:
    """Stored representation -> float32; lossy dtypes need their per-token ``scales``
    (shape ``values.shape[:-1]``)."""
    if dtype == "bfloat16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    if is_scaled(dtype):
        if scales is None:
            raise ValueError(f"{dtype} values are decoded with their per-token scales")
        codes = FLOAT8_E4M3[values] if dtype == "float8_e4m3" else values.astype(np.float32)
        return codes * scales.astype(np.float32, copy=False)[..., None]
    return values.astype(np.float32, copy=False)


def _float8_e4m3_table() -> np.ndarray:
    """float32 value of each of the 256 e4m3fn bit patterns (sign, 4 exponent bits with bias 7,
    3 mantissa bits, no infinities, NaN at S.1111.111): numpy has no float8."""
    bits = np.arange(256)
    exponent, mantissa = (bits >> 3) & 0xF, bits & 0x7
    normal = (1 + mantissa / 8) * np.exp2(exponent - 7.0)
    values = np.where(exponent == 0, mantissa / 8 * 2.0**-6, normal)
    values = np.where(bits >= 128, -values, values)
    values[(exponent == 0xF) & (mantissa == 0x7)] = np.nan
    return values.astype(np.float32)


FLOAT8_E4M3 = _float8_e4m3_table()


def storage_tensor(hidden: torch.Tensor, dtype: str) -> torch.Tensor:
    """A tensor in the stored representation, ready for ``.numpy()`` (bfloat16 as int16 bits);
    lossy dtypes go through ``quantize``."""
    import torch

    if dtype == "bfloat16":
        return hidden.to(torch.bfloat16).view(torch.int16)
    return hidden.to(getattr(torch, dtype))


def quantize(states: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, per-token float32 scales) of ``states`` (..., d) in a lossy dtype; codes are
    int8, or float8 e4m3 bits as uint8."""
    import torch

    values = states.float()
    peak = values.abs().amax(dim=-1)
    scales = torch.where(peak > 0, peak / SCALED_MAX[dtype], torch.ones_like(peak))
    scaled = values / scales[..., None]
    if dtype == "int8":
        return torch.round(scaled).clamp_(-127, 127).to(torch.int8), scales
    limit = SCALED_MAX[dtype]
    return scaled.clamp_(-limit, limit).to(torch.float8_e4m3fn).view(torch.uint8), scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: str) -> torch.Tensor:
    """float32 values of ``quantize``'s output, as a cache reader decodes them."""
    import torch

    values = codes.view(torch.float8_e4m3fn) if dtype == "float8_e4m3" else codes
    return values.float() * scales[..., None]


def round_to_storage(states: torch.Tensor, dtype: str) -> torch.Tensor:
    """float32 states rounded as the cache stores them (round to nearest even; lossy dtypes
    quantized and decoded), kept float32: features computed on the fly then equal the cached
    ones."""
    if dtype == "float32":
        return states
    if is_scaled(dtype):
        return dequantize(*quantize(states, dtype), dtype)
    import torch

    return states.to(getattr(torch, dtype)).float()


def error_bound(values: np.ndarray, dtype: str) -> np.ndarray:
    """The largest storage error a lossy ``dtype`` allows for each of ``values`` (..., d):
    half a code step at the per-token scale (0 for exact dtypes: they are covered by RTOL)."""
    if not is_scaled(dtype):
        return np.zeros_like(values, dtype=np.float32)
    scales = np.abs(values).max(axis=-1, keepdims=True) / SCALED_MAX[dtype]
    if dtype == "int8":
        return np.broadcast_to(scales / 2, values.shape).astype(np.float32)
    return (np.abs(values) / 16 + scales / 1024).astype(np.float32)


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

"""Stage one's settings: what ``sherl-cache extract`` takes, validated on creation."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..runtime import STORAGE_DTYPE_NAMES, Device, StorageDtype, check_device


@dataclass(frozen=True)
class ExtractConfig:
    """Everything ``sherl-cache extract`` takes; validated on creation."""

    model: str
    task: str | None = None
    data_dir: Path | None = None
    data_files: Mapping[str, Path] | None = None
    text_columns: tuple[str, ...] | None = None
    label_column: str | None = None
    layers: str = "all"
    dtype: StorageDtype | None = None  # None: the family's default (bfloat16 where fp16 overflows)
    max_length: int = 128
    batch_size: int = 32
    device: Device = "auto"
    cache: str | None = None
    cache_root: Path = Path("cache")
    splits: tuple[str, ...] | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    chunk_tokens: int | None = None
    shard_chunks: int | None = None

    def __post_init__(self) -> None:
        if self.task is None and not self.data_files:
            raise ConfigError("nothing to extract: pass --task NAME and/or --data split=FILE,...")
        if self.data_files and self.task is None and not self.text_columns:
            raise ConfigError("--data without --task needs --text-columns (one or two names)")
        if self.text_columns is not None and not 1 <= len(self.text_columns) <= 2:
            raise ConfigError("--text-columns takes one or two column names")
        if self.dtype is not None and self.dtype not in STORAGE_DTYPE_NAMES:
            raise ConfigError(
                f"unknown dtype {self.dtype!r} (--dtype): choose float32, float16 or bfloat16"
            )
        check_device(self.device)
        if self.max_length < 2:
            raise ConfigError(f"--max-length must be at least 2, got {self.max_length}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be positive, got {self.batch_size}")
        for flag, value in (
            ("--chunk-tokens", self.chunk_tokens),
            ("--shard-chunks", self.shard_chunks),
        ):
            if value is not None and value < 1:
                raise ConfigError(f"{flag} must be positive, got {value}")

"""Stage one's settings: what ``sherl-cache extract`` takes, validated on creation.

Each field's default, flag, help and choices are written here once; the CLI options and the
pipeline TOML keys are derived from them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import ConfigError
from ..runtime import Device, StorageDtype
from .settings import LAYER_SPEC, POSITIVE, at_least, setting, validate

DATA, MODEL, RUN = "Data", "Model", "Run"

# How stage two reads the backbone; recorded in the cache manifest (``model.route``).
Route = Literal["encoder", "seq2seq"]


@dataclass(frozen=True)
class ExtractConfig:
    """Everything ``sherl-cache extract`` takes; validated on creation."""

    model: str = setting(help="Hugging Face model id or local folder.", panel=MODEL)
    task: str | None = setting(None, help="GLUE task name (cola, sst2, mrpc, ...).", panel=DATA)
    data_dir: Path | None = setting(
        None, help="Folder with GLUE's layout (MRPC/train.tsv, ...).", panel=DATA
    )
    data_files: Mapping[str, Path] | None = setting(
        None,
        flag="--data",
        help="Own files: train=a.csv,validation=b.jsonl (csv, tsv, jsonl, parquet).",
        panel=DATA,
    )
    text_columns: tuple[str, ...] | None = setting(
        None, help="One or two text column names, comma separated.", panel=DATA
    )
    label_column: str | None = setting(None, help="Label column of own files.", panel=DATA)
    layers: str = setting(
        "default",
        help="Hidden-state indices: default (what train's default taps read, up to 3 late "
        "layers) | all | i,j,k | every:N (L-1 is always kept).",
        bound=LAYER_SPEC,
        panel=MODEL,
    )
    route: Route | None = setting(
        None,
        help="encoder: fusion, last k layers, pooled head (any family). seq2seq: T5 as the SHERL "
        "paper runs it (text to text, fusion on both sides, last decoder block, label words "
        "scored). Default: seq2seq for T5 checkpoints with a decoder, else encoder.",
        panel=MODEL,
    )
    dtype: StorageDtype | None = setting(
        None,
        help="Storage dtype (default: the family's; bfloat16 where float16 overflows, as in T5).",
        panel=MODEL,
    )
    max_length: int = setting(
        128,
        help="Tokens per example; longer ones are truncated (counted).",
        bound=at_least(2),
        panel=MODEL,
    )
    template: str | None = setting(
        None,
        help="Decoder-only models: how one or two texts become one prompt, e.g. "
        "'{text_a}\\n{text_b}' (\\n and \\t mean newline and tab); BOS and EOS are added "
        "around it. Default: the family's.",
        panel=MODEL,
    )
    batch_size: int = setting(32, help="Examples per forward pass.", bound=POSITIVE, panel=RUN)
    device: Device = setting(
        "auto", help="Where the backbone runs (auto: CUDA when present).", panel=RUN
    )
    cache: str | None = setting(None, help="Explicit store path (or fsspec URL).", panel=RUN)
    cache_root: Path = setting(
        Path("cache"), help="Folder holding caches under derived names.", panel=RUN
    )
    splits: tuple[str, ...] | None = setting(
        None,
        help="Only these splits, comma separated (default: the labelled ones; test only when "
        "named).",
        panel=DATA,
    )
    revision: str | None = setting(None, help="Hub revision of the model.", panel=MODEL)
    trust_remote_code: bool = setting(
        False, help="Allow model code from the hub (off by default).", panel=MODEL
    )
    ignore_free_space: bool = setting(
        False, help="Extract even when the size estimate exceeds the free disk space.", panel=RUN
    )
    chunk_tokens: int | None = setting(
        None, help="Tokens per stored chunk.", bound=POSITIVE, hidden=True
    )
    shard_chunks: int | None = setting(
        None, help="Chunks per shard file.", bound=POSITIVE, hidden=True
    )

    def __post_init__(self) -> None:
        if self.task is None and not self.data_files:
            raise ConfigError("nothing to extract: pass --task NAME and/or --data split=FILE,...")
        if self.data_files and self.task is None and not self.text_columns:
            raise ConfigError("--data without --task needs --text-columns (one or two names)")
        if self.text_columns is not None and not 1 <= len(self.text_columns) <= 2:
            raise ConfigError("--text-columns takes one or two column names")
        validate(self)

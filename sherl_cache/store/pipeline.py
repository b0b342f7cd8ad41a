"""Which Zarr codec pipeline writes a cache: zarr-python's own, always (issue 12).

zarr-python lets the codec pipeline be swapped by configuration, including from the
environment (``ZARR_CODEC_PIPELINE__PATH=zarrs.ZarrsCodecPipeline``). The Rust pipeline of the
``zarrs`` package (0.2.3, zarrs 0.23) reads our caches exactly, but does not write them as this
format requires:

* it never stores a chunk that holds only the fill value, inside a shard or as a whole shard,
  whatever ``write_empty_chunks`` says: an all-zero chunk (``token_type_ids`` of a
  single-sentence task, a split's all-zero ``labels``) is left out, and ``verify`` then reports
  a flagged unit's shard as missing;
* with more than one thread it places a shard's chunks in the file in the order its threads
  finish, so the same data gives different bytes from run to run (one thread gives zarr-python's
  bytes);
* it writes files in place (``O_TRUNC``, then write) instead of a temporary file renamed into
  place, so a kill leaves a torn file rather than none (docs/reliability.md, "Atomic files");
* a failed write raises ``RuntimeError`` rather than ``OSError``, which the writer's one-line
  "writing the cache failed ... stays resumable" error relies on.

So writers refuse any pipeline but the default (``check_write_pipeline``) instead of silently
producing a cache that ``verify`` may reject; reading with another pipeline is not checked.
``codec_pipeline`` selects one for a block of code; ``allow_unsafe=True`` lifts the refusal, for
measurements only (``benchmarks/extract_throughput.py --codec-pipeline zarrs``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import zarr

from ..errors import ConfigError

DEFAULT_PIPELINE = "zarr.core.codec_pipeline.BatchedCodecPipeline"
ZARRS_PIPELINE = "zarrs.ZarrsCodecPipeline"
PIPELINES = ("zarr", "zarrs")

_unsafe_allowed = False  # set only inside ``codec_pipeline(..., allow_unsafe=True)``


def configured_pipeline() -> str:
    """The codec pipeline zarr opens arrays with now (``codec_pipeline.path``)."""
    return str(zarr.config.get("codec_pipeline.path"))


def check_write_pipeline() -> None:
    """Refuse to write a cache through any codec pipeline but zarr-python's own (see above)."""
    path = configured_pipeline()
    if path == DEFAULT_PIPELINE or _unsafe_allowed:
        return
    raise ConfigError(
        f"zarr's codec pipeline is set to {path!r} (zarr.config or ZARR_CODEC_PIPELINE__PATH); "
        f"sherl-cache writes caches only with {DEFAULT_PIPELINE!r}, the one whose bytes its "
        "format and `verify` rely on: unset it for extraction"
    )


def pipeline_config(name: str, threads: int | None = 1) -> dict[str, Any]:
    """zarr.config settings selecting pipeline ``name`` ("zarr" or "zarrs").

    zarrs runs strict (an array it cannot handle is an error, never a silent fallback to
    zarr-python) and on ``threads`` threads (None: every core; 1 is the only count whose shard
    bytes do not depend on thread timing).
    """
    if name == "zarr":
        return {"codec_pipeline.path": DEFAULT_PIPELINE}
    if name == "zarrs":
        try:
            import zarrs  # noqa: F401
        except ImportError:
            raise ConfigError(
                "codec pipeline 'zarrs' needs the zarrs package: pip install zarrs"
            ) from None
        return {
            "codec_pipeline.path": ZARRS_PIPELINE,
            "codec_pipeline.strict": True,
            "codec_pipeline.validate_checksums": True,
            "threading.max_workers": threads,
        }
    raise ConfigError(f"unknown codec pipeline {name!r} (one of {', '.join(PIPELINES)})")


@contextlib.contextmanager
def codec_pipeline(
    name: str, *, threads: int | None = 1, allow_unsafe: bool = False
) -> Iterator[None]:
    """Open (and so read and write) arrays with pipeline ``name`` inside the block.

    Arrays keep the pipeline they were opened with. Writing a cache through zarrs needs
    ``allow_unsafe=True``: for measurements only, never for a cache anyone will use.
    """
    global _unsafe_allowed
    previous = _unsafe_allowed
    with zarr.config.set(pipeline_config(name, threads)):
        _unsafe_allowed = allow_unsafe and name != "zarr"
        try:
            yield
        finally:
            _unsafe_allowed = previous

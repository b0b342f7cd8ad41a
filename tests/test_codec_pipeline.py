"""Codec pipelines (issue 12): caches are written by zarr-python's own pipeline only.

The Rust pipeline of the ``zarrs`` package reads caches exactly and, on one thread, writes the
same chunk bytes for chunks that hold data; but it never stores a chunk of only the fill value
and its write errors are not ``OSError`` (``sherl_cache/store/pipeline.py`` lists what breaks).
The ``xfail(strict=True)`` tests pin those two gaps: when a zarrs release closes one they pass,
the suite fails, and the refusal in ``check_write_pipeline`` is worth revisiting.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import stored_files, tiny_extract_config

from sherl_cache import open_cache
from sherl_cache.errors import ConfigError
from sherl_cache.extraction.extract import extract
from sherl_cache.store.cache import compressors
from sherl_cache.store.pipeline import (
    DEFAULT_PIPELINE,
    ZARRS_PIPELINE,
    check_write_pipeline,
    codec_pipeline,
)
from sherl_cache.store.verify import verify_cache

needs_zarrs = pytest.mark.skipif(
    importlib.util.find_spec("zarrs") is None,
    reason="the zarrs package is not installed (pip install zarrs)",
)


def bert_config(cache_root: Path, tiny_models, glue_dir, dtype: str = "float32"):
    """The ``bert_cache`` fixture's extraction (default geometry: one chunk per split)."""
    return tiny_extract_config(tiny_models["bert"], glue_dir, cache_root, dtype=dtype)


def all_arrays(path: str) -> dict[str, np.ndarray]:
    cache = open_cache(path)
    return {f"{s}/{n}": a[:] for s in cache.splits for n, a in cache.arrays(s)}


# --- the refusal (no zarrs needed: the setting alone is refused) ----------------------------


def test_default_pipeline_is_accepted():
    assert zarr.config.get("codec_pipeline.path") == DEFAULT_PIPELINE
    check_write_pipeline()
    with codec_pipeline("zarr"):
        check_write_pipeline()


def test_extract_refuses_another_codec_pipeline(tmp_path, tiny_models, glue_dir):
    config = bert_config(tmp_path / "cache", tiny_models, glue_dir)
    refused = pytest.raises(ConfigError, match="codec pipeline .* unset it for extraction")
    with zarr.config.set({"codec_pipeline.path": ZARRS_PIPELINE}), refused:  # as the env var
        extract(config, progress=False)
    assert not [p for p in (tmp_path / "cache").glob("*") if p.suffix != ".lock"]
    check_write_pipeline()  # the setting did not outlive its block


def test_unknown_pipeline_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown codec pipeline"), codec_pipeline("tensorstore"):
        pass


# --- zarrs ----------------------------------------------------------------------------------


@needs_zarrs
def test_zarrs_reads_a_cache_exactly(bert_cache):
    """Consolidated metadata, sharded blosc + crc32c arrays, checksums validated: equal reads."""
    expected = all_arrays(bert_cache)
    with codec_pipeline("zarrs", threads=None):  # strict: no silent fallback to zarr-python
        cache = open_cache(bert_cache)
        name, array = next(cache.arrays(cache.splits[0]))
        assert type(array.async_array.codec_pipeline).__name__ == "ZarrsCodecPipeline"
        found = all_arrays(bert_cache)
        # a read across a chunk boundary and a partial one, as training reads
        layer = cache.layers[-1]
        assert np.array_equal(
            cache.hidden_tokens("train", layer, 3, 77),
            open_cache(bert_cache).hidden_tokens("train", layer, 3, 77),
        )
        assert verify_cache(bert_cache).ok
    assert expected.keys() == found.keys()
    for key in expected:
        assert expected[key].dtype == found[key].dtype
        assert np.array_equal(expected[key], found[key]), key


@needs_zarrs
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_zarrs_on_one_thread_writes_the_same_bytes(tmp_path, tiny_models, glue_dir, dtype):
    """Where no chunk is all fill value (here: one chunk per split), zarrs on one thread
    writes zarr-python's bytes: bfloat16 as uint16 bits, int8 with its float32 scales."""
    reference = extract(
        bert_config(tmp_path / "zarr", tiny_models, glue_dir, dtype), progress=False
    )
    with codec_pipeline("zarrs", threads=1, allow_unsafe=True):
        written = extract(
            bert_config(tmp_path / "zarrs", tiny_models, glue_dir, dtype), progress=False
        )
    a, b = stored_files(reference.path), stored_files(written.path)
    assert sorted(a) == sorted(b)
    assert [name for name in a if a[name] != b[name]] == []
    assert verify_cache(written.path).ok
    expected, found = all_arrays(reference.path), all_arrays(written.path)
    assert all(np.array_equal(expected[k], found[k]) for k in expected)


def write_with_a_zero_shard(path: Path, pipeline: str) -> None:
    with codec_pipeline(pipeline, allow_unsafe=True):
        array = zarr.create_array(
            str(path),
            shape=(512, 8),
            chunks=(64, 8),
            shards=(256, 8),
            dtype="float32",
            compressors=compressors(),
            fill_value=0,
            config={"write_empty_chunks": True},  # what cache.writable() asks for
        )
        data = np.ones((512, 8), np.float32)
        data[64:128] = 0  # an all-zero chunk in shard 0
        data[256:] = 0  # shard 1 all zeros
        array[:] = data


@needs_zarrs
@pytest.mark.xfail(
    strict=True,
    reason="zarrs 0.2.3 stores no chunk of only the fill value, whatever write_empty_chunks says",
)
def test_zarrs_stores_chunks_of_only_the_fill_value(tmp_path):
    write_with_a_zero_shard(tmp_path / "zarr", "zarr")
    write_with_a_zero_shard(tmp_path / "zarrs", "zarrs")
    expected = stored_files(str(tmp_path / "zarr"))
    assert {"c/0/0", "c/1/0"} <= expected.keys()  # zarr-python: every chunk, every shard
    assert stored_files(str(tmp_path / "zarrs")) == expected


@needs_zarrs
@pytest.mark.xfail(
    strict=True, reason="zarrs 0.2.3 raises RuntimeError('... (os error N)') on a failed write"
)
def test_zarrs_write_failure_is_an_os_error(tmp_path):
    with codec_pipeline("zarrs", allow_unsafe=True):
        array = zarr.create_array(
            str(tmp_path / "a"), shape=(64,), chunks=(64,), dtype="int32", fill_value=0
        )
        (tmp_path / "a" / "c").write_text("a file where the chunk folder goes")
        with pytest.raises(OSError):
            array[:] = 1

"""The one place that uses Zarr's non-public API, so a Zarr release that moves it breaks here,
and ``tests/test_conventions.py::test_zarr_private_api_still_works`` says so by name.

Zarr 3 has no public synchronous read of one raw store key (``verify`` needs a chunk's stored
bytes, which Zarr's array reads decode or hide when absent). ``sync`` runs the store's
coroutine on Zarr's own event loop, which fsspec stores (S3) are bound to; ``asyncio.run``
would use another loop, and ``Store._get_bytes_sync`` is private too.
"""

from __future__ import annotations

import zarr
from zarr.buffer import default_buffer_prototype
from zarr.core.sync import sync

__all__ = ["read_raw"]


def read_raw(array: zarr.Array, key: str) -> bytes | None:
    """The stored bytes of ``key`` under ``array``'s path, or None where nothing is stored."""
    buffer = sync((array.store_path / key).get(prototype=default_buffer_prototype()))
    return None if buffer is None else buffer.to_bytes()

"""Writing a cache: one writer per path, open-or-create, units on a background thread, finish.

Both extraction drivers (one process, or one dask task per unit) write through this module,
so a cache holds the same bytes whichever made it, and either can finish what the other began.

What a kill at any moment leaves behind, and why a rerun repairs it (docs/reliability.md):
LocalStore writes every file atomically (temp file + rename), so a shard is either absent or
whole; a unit's flag is written after all its shards; a new store carries a ``creating`` marker
until its manifest is written; and ``complete`` is set last.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import queue
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import zarr

from ..errors import CacheError, CacheLockedError, CacheMismatchError
from ..runtime import is_scaled
from .cache import (
    CREATING,
    DECODER,
    Cache,
    DecoderLayout,
    Geometry,
    create_split,
    creation_marker,
    hidden_name,
    open_cache,
    open_store,
    scale_name,
    writable,
)
from .pipeline import check_write_pipeline

# Test hooks for the crash tests (tests/test_reliability.py); unset in normal use.
KILL_AT_ENV = "SHERL_CACHE_TEST_KILL_AT"  # SIGKILL this process at the named point
UNIT_DELAY_ENV = "SHERL_CACHE_TEST_UNIT_DELAY"  # seconds to sleep before writing each unit

# Manifest fields a mismatch message compares: the inputs a user can change.
INPUT_FIELDS = ("model", "tokenizer", "layers", "dtype", "max_length", "task", "data")


def is_url(path: str) -> bool:
    """An fsspec URL (``s3://...``) rather than a local folder."""
    return "://" in str(path)


def fault_point(name: str) -> None:
    """Die here, hard, if a crash test asked for it: aims a real SIGKILL at an exact moment."""
    if os.environ.get(KILL_AT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def write_error(error: BaseException) -> BaseException:
    """A failed store write as the one-line error a user can act on; other errors unchanged."""
    if isinstance(error, OSError):
        return CacheError(
            f"writing the cache failed ({error.strerror or error}); the cache stays resumable: "
            "fix the cause (free disk space) and re-run the same command"
        )
    return error


def first_difference(
    expected: Mapping[str, Any], found: Mapping[str, Any], prefix: str = ""
) -> tuple[str, Any, Any] | None:
    """The first differing (field path, expected, found), for one-line mismatch errors."""
    for name in sorted(set(expected) | set(found)):
        a, b = expected.get(name), found.get(name)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            diff = first_difference(a, b, f"{prefix}{name}.")
            if diff:
                return diff
        elif a != b:
            return f"{prefix}{name}", a, b
    return None


@contextlib.contextmanager
def cache_lock(path: str) -> Iterator[None]:
    """One writer per cache: a second extraction of the same path is refused, not interleaved."""
    if is_url(path):
        yield  # object stores have no cheap lock; distributed units never share shards
        return
    import fcntl

    lock_path = Path(str(path).rstrip("/") + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CacheLockedError(
                f"another sherl-cache process is writing {path} (lock {lock_path}); "
                "wait for it to finish"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- open or create --------------------------------------------------------------------------


class SplitLayout(Protocol):
    """What creating a split's arrays needs to know about its tokens (a ``TokenizedSplit``)."""

    @property
    def offsets(self) -> np.ndarray: ...

    @property
    def labels(self) -> np.ndarray | None: ...

    @property
    def has_token_types(self) -> bool: ...


class UnitRange(NamedTuple):
    """One write unit of a split: its shard index and its token range [start, stop)."""

    index: int
    start: int
    stop: int


@dataclass
class OpenedStore:
    """The store an extraction fills, or the complete cache it finds there instead."""

    path: str
    manifest: dict[str, Any]
    root: zarr.Group | None  # None when ``complete`` is set: nothing to write
    geometry: Geometry  # the stored one on a resume: units must not straddle existing shards
    resumed: bool
    complete: Cache | None = None

    def pending(self) -> dict[str, list[UnitRange]]:
        """Every split's units not yet flagged done, in split order."""
        assert self.root is not None
        todo = {}
        for split, meta in self.manifest["splits"].items():
            done = self.root[split]["units_done"][:]
            todo[split] = [
                UnitRange(int(u), *self.geometry.unit_range(int(u), int(meta["tokens"])))
                for u in np.flatnonzero(done == 0)
            ]
        return todo

    def total_units(self) -> int:
        return sum(
            self.geometry.num_units(int(m["tokens"])) for m in self.manifest["splits"].values()
        )


_TORN = "torn"  # _existing: our own store whose creation was interrupted


def open_or_create(
    path: str,
    manifest: dict[str, Any],
    splits: Mapping[str, SplitLayout],
    report: Callable[[str], None] = lambda _: None,
) -> OpenedStore:
    """The store at ``path`` for ``manifest``: complete, resumed, re-created or new.

    Call it under ``cache_lock(path)``. Layers, dtype, geometry and hidden size come from the
    manifest; ``splits`` gives each split's offsets, labels and segment-id presence.
    """
    existing = _existing(path, manifest)
    if isinstance(existing, Cache) and existing.complete:
        return OpenedStore(path, manifest, None, Geometry.of(existing.manifest), False, existing)
    check_write_pipeline()  # zarr-python's codec pipeline only (store/pipeline.py)
    if isinstance(existing, Cache) and not _has_all_arrays(existing, manifest, splits):
        existing = _TORN  # format 1 once wrote the manifest before the arrays: redo
    if isinstance(existing, Cache):
        _remove_partial_files(path)
        report(f"resuming incomplete cache {path}")
        root = open_store(path, mode="r+")
        return OpenedStore(path, manifest, root, Geometry.of(existing.manifest), True)
    if existing == _TORN:
        report(f"re-creating {path}: its creation was interrupted")
    try:
        root = _create(path, manifest, splits, torn=existing == _TORN)
    except OSError as exc:
        raise write_error(exc) from exc
    return OpenedStore(path, manifest, root, Geometry.of(manifest), False)


def _existing(path: str, manifest: Mapping[str, Any]) -> Cache | str | None:
    """What is at ``path``: a cache of these inputs, ``_TORN``, or None (nothing yet).

    Anything else (another cache, a foreign store) is refused rather than overwritten.
    """
    try:
        existing = open_cache(path, allow_incomplete=True)
    except CacheError as exc:
        attrs = _root_attrs(path)
        if attrs.get(CREATING) and attrs.get("key") == manifest["key"]:
            return _TORN
        if attrs.get(CREATING):
            raise CacheMismatchError(
                f"{path} holds an unfinished creation of a cache of other inputs; remove it or "
                "choose another --cache"
            ) from None
        if _store_exists(path):
            raise CacheMismatchError(
                f"{path} exists but is not a usable cache ({exc}); choose another --cache"
            ) from None
        return None
    if existing.manifest.get("key") != manifest["key"]:
        diff = first_difference(
            {k: manifest.get(k) for k in INPUT_FIELDS},
            {k: existing.manifest.get(k) for k in INPUT_FIELDS},
        )
        where = (
            f"field {diff[0]}: cache has {diff[2]!r}, this run needs {diff[1]!r}"
            if diff
            else "other inputs"
        )
        raise CacheMismatchError(
            f"{path} holds a cache of other inputs ({where}); choose another --cache or remove it"
        )
    return existing


def _has_all_arrays(
    cache: Cache, manifest: Mapping[str, Any], splits: Mapping[str, SplitLayout]
) -> bool:
    """Whether every array a resume writes to exists; no unit is written before they all do."""
    for name, layout in splits.items():
        try:
            present = set(cache.split_group(name).array_keys())
        except (KeyError, CacheError):
            return False
        needed = {"offsets", "input_ids", "units_done", *map(hidden_name, manifest["layers"])}
        if is_scaled(manifest["dtype"]):
            needed |= set(map(scale_name, manifest["layers"]))
        needed |= {"labels"} if layout.labels is not None else set()
        needed |= {"token_type_ids"} if layout.has_token_types else set()
        if not needed <= present:
            return False
        decoder = DecoderLayout.of(manifest)
        if decoder is not None:
            try:
                arrays = set(cache.split_group(name)[DECODER].array_keys())
            except KeyError:
                return False
            if not {"done", *map(hidden_name, decoder.layers)} <= arrays:
                return False
    return True


def _root_attrs(path: str) -> dict[str, Any]:
    try:
        return dict(open_store(path, mode="r").attrs)
    except CacheError:
        return {}


def _store_exists(path: str) -> bool:
    """A non-empty folder; temp files of an interrupted first write do not count."""
    if is_url(path):
        return False
    folder = Path(path)
    return folder.exists() and any(not p.name.endswith(".partial") for p in folder.iterdir())


def _remove_partial_files(path: str) -> None:
    """Delete temp files of writes a kill interrupted (LocalStore's ``*.partial``); harmless
    to readers, but they would otherwise pile up over many interrupted runs."""
    if is_url(path):
        return
    for folder, _, files in os.walk(path):
        for name in files:
            if name.endswith(".partial"):
                Path(folder, name).unlink(missing_ok=True)


def _create(
    path: str, manifest: dict[str, Any], splits: Mapping[str, SplitLayout], torn: bool
) -> zarr.Group:
    """Create every array, then write the manifest: a kill in between leaves only the marker.

    A torn store is redone in place (its marker stays) instead of deleted and recreated, so
    no moment exists at which the folder holds arrays but no marker.
    """
    _remove_partial_files(path)
    if torn:
        root = open_store(path, mode="r+")
    else:
        # One write creates the root group with its marker: there is no marker-less moment.
        marker = creation_marker(manifest["key"], manifest.get("command"))
        root = zarr.open_group(path, mode="w", zarr_format=3, attributes=marker)
    fault_point("store-created")
    for name, layout in splits.items():
        create_split(
            root,
            name,
            offsets=layout.offsets,
            labels=layout.labels,
            layers=manifest["layers"],
            hidden_size=int(manifest["model"]["hidden_size"]),
            dtype=manifest["dtype"],
            geometry=Geometry.of(manifest),
            has_token_types=layout.has_token_types,
            decoder=DecoderLayout.of(manifest),
        )
        fault_point(f"split-created:{name}")
    created = dt.datetime.now(dt.timezone.utc).isoformat()
    root.attrs.put(dict(manifest, complete=False, created=created))  # replaces the marker
    fault_point("manifest-written")
    return root


# --- units -----------------------------------------------------------------------------------


@dataclass
class Unit:
    """One computed unit, ready to store: its token-axis data in the storage representation."""

    split: str
    index: int
    start: int
    stop: int
    hidden: np.ndarray  # (layers, tokens, hidden)
    input_ids: np.ndarray
    token_type_ids: np.ndarray | None
    scales: np.ndarray | None = None  # (layers, tokens): lossy dtypes' per-token scales


class UnitWriter:
    """Writes finished units on a background thread so the forward pass never waits on I/O.

    ``opened`` is a cache of opened arrays by split that the caller may keep across writers
    (a dask worker does, since each open re-reads metadata: a request per array on S3).
    """

    def __init__(
        self,
        root: zarr.Group,
        layers: tuple[int, ...],
        depth: int = 2,
        opened: dict[str, dict[str, Any]] | None = None,
    ):
        check_write_pipeline()  # also in dask workers, which open no store
        self._root = root
        self._layers = layers
        self._queue: queue.Queue[Unit | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._open = {} if opened is None else opened
        self._thread = threading.Thread(target=self._run, name="sherl-cache-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (unit := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._write(unit)
                except BaseException as exc:  # re-raised in the main thread
                    self._error = exc

    def _write(self, unit: Unit) -> None:
        delay = float(os.environ.get(UNIT_DELAY_ENV) or 0)
        if delay:
            time.sleep(delay)
        arrays = self._arrays(unit.split)
        span = slice(unit.start, unit.stop)
        # A unit spans whole shards, so each assignment is one atomic shard-file write.
        arrays["input_ids"][span] = unit.input_ids
        if unit.token_type_ids is not None:
            arrays["token_type_ids"][span] = unit.token_type_ids
        for position, layer in enumerate(self._layers):
            if unit.scales is not None:
                arrays[scale_name(layer)][span] = unit.scales[position]
            arrays[hidden_name(layer)][span] = unit.hidden[position]
            if position == 0:
                fault_point(f"unit-partly-written:{unit.split}:{unit.index}")
        fault_point(f"unit-written:{unit.split}:{unit.index}")
        arrays["units_done"][unit.index] = 1  # only after every shard of the unit is stored
        fault_point(f"unit-done:{unit.split}:{unit.index}")

    def _arrays(self, split: str) -> dict[str, Any]:
        """A split's arrays, opened once: each open re-reads metadata (a request on S3)."""
        if split not in self._open:
            group = self._root[split]
            self._open[split] = {name: writable(array) for name, array in group.arrays()}
        return self._open[split]

    def _check(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise write_error(error) from error

    def put(self, unit: Unit) -> None:
        self._check()
        self._queue.put(unit)

    def close(self, check: bool = True) -> None:
        """Finish the queued units; ``check=False`` when another error is already on its way."""
        self._queue.put(None)
        self._thread.join()
        if check:
            self._check()


# --- finishing -------------------------------------------------------------------------------


def finalize(store: OpenedStore) -> dict[str, Any]:
    """Mark a fully written cache complete; returns its storage stats (also recorded)."""
    fault_point("before-finalize")
    assert store.root is not None
    cache = open_cache(store.path, allow_incomplete=True)
    try:
        for split in cache.splits:
            if not cache.units_done(split).all():
                raise CacheError(f"split {split} of {cache.path} still has unwritten units")
            if cache.decoder_layout is not None and not cache.decoder_done(split).all():
                raise CacheError(
                    f"split {split} of {cache.path} still has unwritten decoder blocks"
                )
        stats = storage_stats(cache)
        store.root.attrs.update(
            {
                "stats": stats,
                "complete": True,
                "completed": dt.datetime.now(dt.timezone.utc).isoformat(),
            }
        )
        consolidate(store.root)
    except OSError as exc:
        raise write_error(exc) from exc
    return stats


def consolidate(root: zarr.Group) -> None:
    """Copy every array's metadata into the root's ``zarr.json`` once the cache is complete, so
    xarray and dask open it without a warning and with one metadata read on object stores.

    Zarr warns that consolidation is not (yet) in the v3 specification; it is zarr-python's and
    xarray's shared convention, and a reader that ignores it reads the arrays' own metadata.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(root.store, zarr_format=3)


def storage_stats(cache: Cache) -> dict[str, Any]:
    """Rows, tokens and stored vs raw bytes, per split and in total."""
    per_split = {}
    for split in cache.splits:
        stored = raw = 0
        for _, array in cache.arrays(split):
            stored += array.nbytes_stored()
            raw += array.nbytes
        per_split[split] = {
            "rows": cache.num_examples(split),
            "tokens": cache.num_tokens(split),
            "bytes_stored": int(stored),
            "bytes_raw": int(raw),
        }
    return {
        "rows": sum(s["rows"] for s in per_split.values()),
        "tokens": sum(s["tokens"] for s in per_split.values()),
        "bytes_stored": sum(s["bytes_stored"] for s in per_split.values()),
        "bytes_raw": sum(s["bytes_raw"] for s in per_split.values()),
        "per_split": per_split,
    }


def recorded_stats(cache: Cache) -> dict[str, Any]:
    """The stats ``finalize`` recorded in a complete cache, without reading its arrays."""
    stats = cache.manifest.get("stats", {})
    totals = {name: stats.get(name, 0) for name in ("rows", "tokens", "bytes_stored", "bytes_raw")}
    return dict(totals, per_split=stats.get("per_split", {}))

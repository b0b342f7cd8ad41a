"""The on-disk cache format: one Zarr v3 group per cache, one subgroup per split.

Layout (see docs/cache-format.md)::

    <cache>/zarr.json                 root attributes = the manifest
    <cache>/<split>/offsets           (examples + 1,) int64   token offsets of each example
    <cache>/<split>/input_ids         (tokens,) int32         flat token axis, no padding
    <cache>/<split>/token_type_ids    (tokens,) int8          only for models that use them
    <cache>/<split>/labels            (examples,) int64 | float32  class index | score; only in
                                                                   labelled splits
    <cache>/<split>/hidden_007        (tokens, hidden)        hidden-state index 7
    <cache>/<split>/scale_007         (tokens,) float32       per-token scales (int8, float8)
    <cache>/<split>/units_done        (units,) uint8          1 once a write unit is durable

The token axis is cut into shards of ``shard_tokens``; a *unit* is one shard index across every
token-axis array of a split, written in one go, then flagged in ``units_done``. A unit is the
smallest piece of work that is ever taken as finished, which is what makes resume and parallel
extraction safe (Zarr loses data when two writers touch one shard).

Crash safety rests on three rules (docs/reliability.md): every chunk is written even when it
holds only the fill value, so a missing shard always means "not written" rather than "zeros";
a store is born with a small ``creating`` marker as its attributes and gets its manifest only
after every array exists; ``complete`` turns true only after every unit is flagged.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

from ..errors import CacheError, CacheIncompleteError
from ..runtime import SCALE_DTYPE, STORAGE_DTYPES, from_storage, is_scaled

FORMAT_VERSION = 1
CHUNK_TARGET_BYTES = 1 << 20
UNIT_BUDGET_BYTES = 256 << 20  # one unit's buffer across all stored layers
MAX_CHUNKS_PER_SHARD = 32

# Manifest fields that decide the cache contents; everything else is bookkeeping.
CONTENT_FIELDS = (
    "format_version",
    "model",
    "tokenizer",
    "layers",
    "dtype",
    "max_length",
    "truncation_side",
    "task",
    "data",
)


# Attribute set on a store whose arrays are still being created; see ``creation_marker``.
CREATING = "creating"


def hidden_name(layer: int) -> str:
    return f"hidden_{layer:03d}"


def scale_name(layer: int) -> str:
    """The per-token scales of a lossy dtype's ``hidden_NNN`` (runtime.quantize)."""
    return f"scale_{layer:03d}"


def compressors() -> list:
    """Blosc-LZ4 with bit-shuffle, then a crc32c checksum per chunk.

    Chosen by ``benchmarks/codecs.py`` on real MiniLM activations (README has the table):
    bit-shuffle exposes the regular sign/exponent bits of activations, and LZ4 after it keeps
    ~98% of zstd's ratio at ~3.5x its speed (about 1 GB/s on one core), so the codec keeps up
    with GPU extraction rates.
    """
    return [
        BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.bitshuffle),
        Crc32cCodec(),
    ]


def cache_key(manifest: Mapping[str, Any]) -> str:
    """Hash of the content-deciding fields: same inputs, same key; other inputs, other key."""
    content = {name: manifest.get(name) for name in CONTENT_FIELDS}
    blob = json.dumps(content, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class Geometry:
    """Chunk and shard sizes along the token axis, shared by every array of a cache."""

    chunk_tokens: int
    shard_tokens: int

    @classmethod
    def choose(
        cls,
        hidden_size: int,
        num_layers_stored: int,
        dtype: str,
        chunk_tokens: int | None = None,
        shard_chunks: int | None = None,
    ) -> Geometry:
        """Chunks of at least ~1 MiB; shards as large as a bounded unit buffer allows."""
        row_bytes = hidden_size * STORAGE_DTYPES[dtype].itemsize
        if chunk_tokens is None:
            chunk_tokens = 1 << math.ceil(math.log2(max(1, CHUNK_TARGET_BYTES // row_bytes)))
        if shard_chunks is None:
            unit_chunk_bytes = chunk_tokens * row_bytes * num_layers_stored
            shard_chunks = max(1, min(MAX_CHUNKS_PER_SHARD, UNIT_BUDGET_BYTES // unit_chunk_bytes))
        return cls(chunk_tokens=chunk_tokens, shard_tokens=chunk_tokens * shard_chunks)

    @classmethod
    def of(cls, manifest: Mapping[str, Any]) -> Geometry:
        """The geometry a manifest records: every reader and resume must cut shards alike."""
        stored = manifest["geometry"]
        return cls(int(stored["chunk_tokens"]), int(stored["shard_tokens"]))

    def num_units(self, num_tokens: int) -> int:
        return max(1, math.ceil(num_tokens / self.shard_tokens))

    def unit_range(self, unit: int, num_tokens: int) -> tuple[int, int]:
        start = unit * self.shard_tokens
        return start, min(start + self.shard_tokens, num_tokens)


# Zarr skips chunks equal to the fill value by default, and a skipped chunk reads back as the
# fill value: then a lost shard and an all-zero one look alike. Writing every chunk makes
# "absent" mean "never written", which ``sherl-cache verify`` relies on.
WRITE_ALL_CHUNKS = {"write_empty_chunks": True}


def writable(array: zarr.Array) -> zarr.Array:
    """The same array, set to store chunks that hold only the fill value (see above)."""
    return array.with_config(WRITE_ALL_CHUNKS)


def _token_array(
    group, name, length, dtype, geometry: Geometry, extra_dims=(), dims=(), attrs=None
):
    return group.create_array(
        name,
        shape=(max(length, 0), *extra_dims),
        chunks=(geometry.chunk_tokens, *extra_dims),
        shards=(geometry.shard_tokens, *extra_dims),
        dtype=dtype,
        compressors=compressors(),
        fill_value=0,
        dimension_names=list(dims),
        attributes=attrs,  # in the array's one metadata write, never a second one
    )


def _example_array(group, name: str, data: np.ndarray, dim: str) -> zarr.Array:
    """Per-example arrays get the same crc32c as hidden states, and keep all-zero chunks."""
    return group.create_array(
        name,
        data=data,
        compressors=compressors(),
        config=WRITE_ALL_CHUNKS,
        dimension_names=[dim],
    )


def create_split(
    root: zarr.Group,
    split: str,
    *,
    offsets: np.ndarray,
    labels: np.ndarray | None,
    layers: Sequence[int],
    hidden_size: int,
    dtype: str,
    geometry: Geometry,
    has_token_types: bool,
    decoder: DecoderLayout | None = None,
) -> zarr.Group:
    """Create every array of a split; per-example arrays are written here, token arrays later.

    A seq2seq cache's split also gets its ``decoder`` subgroup (``decoder``)."""
    num_tokens = int(offsets[-1])
    group = root.create_group(split, overwrite=True)
    _example_array(group, "offsets", offsets.astype(np.int64), "example_edge")
    if labels is not None:
        _example_array(group, "labels", labels, "example")
    _token_array(group, "input_ids", num_tokens, "int32", geometry, dims=["token"])
    if has_token_types:
        _token_array(group, "token_type_ids", num_tokens, "int8", geometry, dims=["token"])
    for layer in layers:
        _token_array(
            group,
            hidden_name(layer),
            num_tokens,
            STORAGE_DTYPES[dtype],
            geometry,
            extra_dims=(hidden_size,),
            dims=["token", "hidden"],
            attrs={"layer": layer, "dtype": dtype},
        )
        if is_scaled(dtype):
            _token_array(
                group,
                scale_name(layer),
                num_tokens,
                SCALE_DTYPE,
                geometry,
                dims=["token"],
                attrs={"layer": layer, "scales": hidden_name(layer)},
            )
    # One chunk per unit: flagging a unit is a single atomic file write. An absent chunk reads
    # as 0, i.e. "not done", which is exactly right for a unit never flagged.
    group.create_array(
        "units_done",
        shape=(geometry.num_units(num_tokens),),
        chunks=(1,),
        dtype="uint8",
        fill_value=0,
        compressors=compressors(),
        dimension_names=["unit"],
    )
    if decoder is not None:
        create_decoder(group, decoder, len(offsets) - 1)
    return group


# --- the decoder side of seq2seq caches ------------------------------------------------------

DECODER = "decoder"  # a seq2seq cache's per-split subgroup of teacher-forced decoder states


@dataclass(frozen=True)
class DecoderLayout:
    """Shape of a seq2seq cache's decoder side: per example, the decoder's states for every
    candidate target (class), each right-padded to the longest target."""

    layers: tuple[int, ...]
    candidates: int
    target_tokens: int
    hidden_size: int
    dtype: str

    @classmethod
    def of(cls, manifest: Mapping[str, Any]) -> DecoderLayout | None:
        """The layout a manifest records; None for encoder-route caches."""
        decoder = manifest["model"].get("decoder")
        if decoder is None:
            return None
        targets = decoder["target_ids"]
        return cls(
            layers=tuple(decoder["layers"]),
            candidates=len(targets),
            target_tokens=max(len(t) for t in targets),
            hidden_size=int(manifest["model"]["hidden_size"]),
            dtype=manifest["dtype"],
        )

    @property
    def chunk_examples(self) -> int:
        """Examples per chunk (and unit of writing): at least ~1 MiB of one layer."""
        row = self.candidates * self.target_tokens * self.hidden_size
        return max(1, CHUNK_TARGET_BYTES // (row * STORAGE_DTYPES[self.dtype].itemsize))

    def num_blocks(self, examples: int) -> int:
        return math.ceil(examples / self.chunk_examples)


def create_decoder(group: zarr.Group, layout: DecoderLayout, examples: int) -> None:
    """A split's decoder arrays (examples, candidates, target tokens, hidden) and their
    per-block ``done`` flags (one chunk per block: flagging is one atomic file write)."""
    decoder = group.create_group(DECODER, overwrite=True)
    shape = (examples, layout.candidates, layout.target_tokens, layout.hidden_size)
    for layer in layout.layers:
        decoder.create_array(
            hidden_name(layer),
            shape=shape,
            chunks=(layout.chunk_examples, *shape[1:]),
            dtype=STORAGE_DTYPES[layout.dtype],
            compressors=compressors(),
            fill_value=0,
            dimension_names=["example", "candidate", "target_token", "hidden"],
            attributes={"layer": layer, "dtype": layout.dtype},
        )
    decoder.create_array(
        "done",
        shape=(layout.num_blocks(examples),),
        chunks=(1,),
        dtype="uint8",
        fill_value=0,
        compressors=compressors(),
        dimension_names=["block"],
    )


def creation_marker(key: str, command: str | None) -> dict[str, Any]:
    """The attributes a store is born with, before any array exists.

    A kill during creation leaves this marker instead of a manifest, so the store is refused
    by ``open_cache`` and recognised by ``extract`` as its own unfinished creation (same
    ``key``), which it then redoes; without it a torn store would look like a foreign one.
    """
    return {
        "format": "sherl-cache",
        "format_version": FORMAT_VERSION,
        CREATING: True,
        "complete": False,
        "key": key,
        "command": command,
    }


def open_store(
    path: str, mode: Literal["r", "r+", "a", "w", "w-"] = "r", consolidated: bool = False
) -> zarr.Group:
    """The store's root group. ``consolidated`` reads the arrays' metadata from the copy a
    complete cache keeps in its root (one read on object stores); writers and integrity checks
    read every array's own metadata, which cannot go stale."""
    try:
        return zarr.open_group(
            path, mode=mode, zarr_format=3, use_consolidated=None if consolidated else False
        )
    except FileNotFoundError:
        raise CacheError(f"no cache at {path}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CacheError(f"{path} is not a sherl-cache store ({exc})") from None


class Cache:
    """Read-only view of a cache, the API that training, sweeps and users build on."""

    def __init__(self, path: str, group: zarr.Group):
        self.path = path
        self._group = group
        self.manifest: dict[str, Any] = dict(group.attrs)
        self._offsets: dict[str, np.ndarray] = {}

    # --- what is in it -------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    @property
    def layers(self) -> list[int]:
        return list(self.manifest["layers"])

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def hidden_size(self) -> int:
        return int(self.manifest["model"]["hidden_size"])

    @property
    def num_layers(self) -> int:
        return int(self.manifest["model"]["num_layers"])

    def _split(self, split: str) -> zarr.Group:
        if split not in self.manifest["splits"]:
            raise CacheError(f"cache {self.path} has no split {split!r} (has {self.splits})")
        return self._group[split]

    def split_group(self, split: str) -> zarr.Group:
        """The Zarr group of one split, for tools that inspect the storage (verify)."""
        return self._split(split)

    def num_examples(self, split: str) -> int:
        return len(self.offsets(split)) - 1

    def num_tokens(self, split: str) -> int:
        return int(self.offsets(split)[-1])

    def offsets(self, split: str) -> np.ndarray:
        if split not in self._offsets:
            self._offsets[split] = self._split(split)["offsets"][:]
        return self._offsets[split]

    def labelled(self, split: str) -> bool:
        return "labels" in self._split(split)

    def labels(self, split: str) -> np.ndarray:
        group = self._split(split)
        if "labels" not in group:
            raise CacheError(f"split {split!r} of {self.path} has no labels")
        return group["labels"][:]

    def layer_array(self, split: str, layer: int) -> zarr.Array:
        if layer not in self.layers:
            raise CacheError(
                f"cache {self.path} does not store hidden-state index {layer} "
                f"(stores {self.layers})"
            )
        return self._split(split)[hidden_name(layer)]

    # --- reading -------------------------------------------------------------------------
    def hidden(self, split: str, layer: int, i: int) -> np.ndarray:
        """Hidden states of example ``i`` at ``layer`` as float32 (tokens, hidden)."""
        start, stop = self._example_range(split, i)
        return self.hidden_tokens(split, layer, start, stop)

    def hidden_tokens(self, split: str, layer: int, start: int, stop: int) -> np.ndarray:
        """A range of the flat token axis as float32: the bulk-read path for training."""
        values = self.layer_array(split, layer)[start:stop]
        if not is_scaled(self.dtype):
            return from_storage(values, self.dtype)
        scales = self._split(split)[scale_name(layer)][start:stop]
        return from_storage(values, self.dtype, scales)

    def scale_array(self, split: str, layer: int) -> zarr.Array | None:
        """The per-token scales of a lossy cache's layer; None for exact dtypes."""
        self.layer_array(split, layer)  # the same error for a layer not stored
        return self._split(split)[scale_name(layer)] if is_scaled(self.dtype) else None

    def input_ids(self, split: str, i: int) -> np.ndarray:
        start, stop = self._example_range(split, i)
        return self._split(split)["input_ids"][start:stop]

    def token_type_ids(self, split: str, i: int) -> np.ndarray | None:
        group = self._split(split)
        if "token_type_ids" not in group:
            return None
        start, stop = self._example_range(split, i)
        return group["token_type_ids"][start:stop]

    def _example_range(self, split: str, i: int) -> tuple[int, int]:
        offsets = self.offsets(split)
        if not 0 <= i < len(offsets) - 1:
            raise IndexError(f"example {i} out of range for split {split!r}")
        return int(offsets[i]), int(offsets[i + 1])

    def units_done(self, split: str) -> np.ndarray:
        return self._split(split)["units_done"][:]

    @property
    def route(self) -> str:
        """How stage two reads this cache: "encoder" or "seq2seq" (manifest ``model.route``)."""
        return str(self.manifest["model"].get("route", "encoder"))

    @property
    def decoder_layout(self) -> DecoderLayout | None:
        return DecoderLayout.of(self.manifest)

    def decoder_array(self, split: str, layer: int) -> zarr.Array:
        """(examples, candidates, target tokens, hidden) decoder states of a seq2seq cache."""
        try:
            return self._split(split)[DECODER][hidden_name(layer)]
        except KeyError:
            raise CacheError(
                f"cache {self.path} stores no decoder state {layer} for split {split!r}"
            ) from None

    def decoder_done(self, split: str) -> np.ndarray:
        return self._split(split)[DECODER]["done"][:]

    def arrays(self, split: str) -> Iterator[tuple[str, zarr.Array]]:
        group = self._split(split)
        for name in sorted(group.array_keys()):
            yield name, group[name]


def open_cache(path: str, *, allow_incomplete: bool = False) -> Cache:
    """Open a cache read-only; an unfinished one is refused unless asked for explicitly."""
    # Only complete caches are consolidated and never change after; anything that may look at
    # an unfinished or damaged one (writers, verify, info) reads the arrays' own metadata.
    group = open_store(str(path), mode="r", consolidated=not allow_incomplete)
    attrs = dict(group.attrs)
    if attrs.get("format") != "sherl-cache":
        raise CacheError(f"{path} is a Zarr store but not a sherl-cache cache (no manifest)")
    if attrs.get("format_version") != FORMAT_VERSION:
        raise CacheError(
            f"cache {path} has format version {attrs.get('format_version')}; this sherl-cache "
            f"reads version {FORMAT_VERSION}: re-run the extract command"
        )
    command = attrs.get("command") or "sherl-cache extract ... (the same arguments)"
    if attrs.get(CREATING):  # even allow_incomplete cannot use it: its arrays may not exist
        raise CacheIncompleteError(
            f"cache {path} is incomplete: it was never fully created (extraction was interrupted "
            f"while creating it); re-run: {command}"
        )
    cache = Cache(str(path), group)
    if not cache.complete and not allow_incomplete:
        raise CacheIncompleteError(
            f"cache {path} is incomplete (extraction was interrupted); finish it with: {command}"
        )
    return cache

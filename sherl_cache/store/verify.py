"""``sherl-cache verify``: read a whole cache back and say exactly what, if anything, is wrong.

Zarr alone cannot be trusted for this: a shard file that is gone reads back as the fill value
(zeros) without any error, and a chunk missing from a shard's index does the same. So the
token-axis arrays are checked at the byte level first: every shard must exist, its index must
pass its crc32c, every chunk inside the array's extent must be listed in the index and pass its
own crc32c. Then every shard is decoded through Zarr, which catches anything the checksums
cannot (a codec that fails on intact bytes). Problems are reported by split, array and token
range, mapped back to example indices through ``offsets``, so a user knows which rows to redo.

``recompute`` re-runs a seeded sample of examples through the backbone recorded in the
manifest and compares them with the cache: checksums prove the bytes are the ones written,
recomputation proves the ones written were right.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ShardingCodecIndexLocation

from ..runtime import RTOL, error_bound, is_scaled
from .cache import Cache, Geometry, hidden_name, open_cache, scale_name
from .zarr_private import read_raw

EMPTY = 2**64 - 1  # sharding index entry of a chunk that is not in the shard


@dataclass(frozen=True)
class Finding:
    """One problem, located as precisely as the storage allows."""

    split: str
    array: str
    what: str
    tokens: tuple[int, int] | None = None  # [start, stop) on the flat token axis
    examples: tuple[int, int] | None = None  # first and last example index, inclusive

    def __str__(self) -> str:
        where = []
        if self.tokens is not None:
            where.append(f"tokens {self.tokens[0]}-{self.tokens[1] - 1}")
        if self.examples is not None:
            first, last = self.examples
            where.append(f"example {first}" if first == last else f"examples {first}-{last}")
        suffix = f" ({', '.join(where)})" if where else ""
        return f"{self.split}/{self.array}: {self.what}{suffix}"


@dataclass
class VerifyReport:
    """What ``verify_cache`` read and found; ``ok`` is what the CLI's exit code follows."""

    path: str
    complete: bool
    command: str | None = None
    problems: list[Finding] = field(default_factory=list)
    shards: int = 0
    chunks: int = 0
    bytes_read: int = 0
    recomputed: int = 0
    worst_ratio: float | None = None  # largest error / tolerance seen when recomputing

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        lines = [
            f"cache      {self.path}",
            f"state      {'complete' if self.complete else 'INCOMPLETE'}",
            f"read       {self.shards} shards, {self.chunks} chunks, {self.bytes_read:,} bytes",
        ]
        if self.recomputed:
            lines.append(
                f"recomputed {self.recomputed} examples: worst error {self.worst_ratio:.3g} of "
                "the storage dtype's tolerance"
            )
        if self.problems:
            lines.append(f"problems   {len(self.problems)}")
            lines += [f"  {problem}" for problem in self.problems]
            hint = (
                f"finish it with: {self.command}"
                if not self.complete
                else "remove the cache and re-run the extract command that made it"
            )
            lines.append(f"result     FAILED: {hint}")
        else:
            lines.append("result     OK")
        return lines


# Where --recompute runs by default: float32 on the CPU is the reference the tolerances (RTOL)
# are set against, and it is independent of the half-precision GPU pass that wrote the cache.
RECOMPUTE_DEVICE = "cpu"


def verify_cache(
    path: str,
    *,
    recompute: int = 0,
    seed: int = 0,
    model: str | None = None,
    device: str = RECOMPUTE_DEVICE,
) -> VerifyReport:
    """Check every byte of the cache at ``path``; optionally recompute ``recompute`` examples.

    Recomputation needs a complete cache (unwritten units would read as zeros). Raises only
    when the cache cannot be opened at all (``open_cache``'s errors) or the model for
    recomputation cannot be found; everything found inside the cache goes in the report.
    """
    cache = open_cache(path, allow_incomplete=True)
    report = VerifyReport(str(path), cache.complete, cache.manifest.get("command"))
    strict = bool(cache.manifest.get("geometry", {}).get("empty_chunks_written"))
    for split in cache.splits:
        _verify_split(cache, split, report, strict)
    if not cache.complete:
        report.problems.append(Finding("*", "*", "the cache is incomplete"))
    elif recompute > 0:
        _recompute(cache, report, recompute, seed, model, device)
    return report


# --- storage checks --------------------------------------------------------------------------


def _raw(array: zarr.Array, key: str) -> bytes | None:
    """The stored bytes of one chunk key, or None if absent: Zarr's reads hide the difference."""
    return read_raw(array, key)


def _crc_ok(blob: bytes) -> bool:
    return len(blob) >= 4 and google_crc32c.value(blob[:-4]).to_bytes(4, "little") == blob[-4:]


def _example_span(offsets: np.ndarray | None, start: int, stop: int) -> tuple[int, int] | None:
    """Examples whose tokens overlap [start, stop): where a token-range problem hits the data."""
    if offsets is None or stop <= start:
        return None
    first = int(np.searchsorted(offsets, start, side="right")) - 1
    last = int(np.searchsorted(offsets, stop, side="left")) - 1
    return max(first, 0), max(last, first, 0)


def _verify_split(
    cache: Cache,
    split: str,
    report: VerifyReport,
    strict: bool,
) -> None:
    meta = cache.manifest["splits"][split]
    try:
        group = cache.split_group(split)
    except (KeyError, FileNotFoundError):
        report.problems.append(Finding(split, "*", "the split's group is missing"))
        return
    arrays: dict[str, zarr.Array] = {}
    expected = ["offsets", "input_ids", "units_done"] + [hidden_name(i) for i in cache.layers]
    if is_scaled(cache.dtype):
        expected += [scale_name(i) for i in cache.layers]
    if meta.get("labelled"):
        expected.append("labels")
    for name in [*expected, "token_type_ids"]:
        try:
            arrays[name] = group[name]
        except KeyError:
            if name != "token_type_ids":  # only models with segment ids have it
                report.problems.append(Finding(split, name, "the array is missing"))

    offsets = _check_offsets(arrays.get("offsets"), split, meta, report, strict)
    if "labels" in arrays:
        labels = _check_example_array(arrays["labels"], split, report, strict)
        if labels is not None and len(labels) != meta["rows"]:
            report.problems.append(
                Finding(split, "labels", f"has {len(labels)} entries for {meta['rows']} rows")
            )

    geometry = Geometry.of(cache.manifest)
    num_tokens = int(meta["tokens"])
    units = geometry.num_units(num_tokens)
    done = np.zeros(units, dtype=bool)
    if "units_done" in arrays:
        flags = _decode(arrays["units_done"], split, "units_done", report)
        if flags is not None and len(flags) != units:
            report.problems.append(
                Finding(split, "units_done", f"has {len(flags)} units, the geometry gives {units}")
            )
        elif flags is not None:
            done = flags.astype(bool)
            report.chunks += units
    # In an unfinished cache only flagged units have to be whole; others may be half written.
    needed = np.ones(units, dtype=bool) if cache.complete else done
    if cache.complete:
        for unit in np.flatnonzero(~done):
            start, stop = geometry.unit_range(int(unit), num_tokens)
            report.problems.append(
                Finding(
                    split,
                    "units_done",
                    f"unit {unit} is not flagged done in a cache marked complete",
                    (start, stop),
                    _example_span(offsets, start, stop),
                )
            )

    token_arrays = [n for n in ("input_ids", "token_type_ids") if n in arrays]
    token_arrays += [hidden_name(i) for i in cache.layers if hidden_name(i) in arrays]
    token_arrays += [scale_name(i) for i in cache.layers if scale_name(i) in arrays]
    for name in token_arrays:
        # Caches from before every chunk was written legitimately lack all-zero segment ids.
        absent_may_be_fill = not strict and name == "token_type_ids"
        report.problems += _check_token_array(
            arrays[name],
            split,
            geometry,
            num_tokens,
            needed,
            done,
            offsets,
            report,
            absent_may_be_fill,
        )


def _decode(array: zarr.Array, split: str, name: str, report: VerifyReport) -> np.ndarray | None:
    try:
        values = array[:]
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a finding, not a crash
        report.problems.append(Finding(split, name, f"cannot be read ({_first_line(exc)})"))
        return None
    report.bytes_read += int(array.nbytes_stored())
    return values


def _check_example_array(
    array: zarr.Array, split: str, report: VerifyReport, strict: bool
) -> np.ndarray | None:
    """Per-example arrays: every chunk present (when all chunks are written) and decodable."""
    if strict:
        for index in range(array.cdata_shape[0]):
            key = array.metadata.encode_chunk_key((index,))
            blob = _raw(array, key)
            lo = index * array.chunks[0]
            span = (lo, min(lo + array.chunks[0], array.shape[0]))
            if blob is None:
                report.problems.append(Finding(split, array.basename, f"chunk {key} is missing"))
            elif _has_crc(array) and not _crc_ok(blob):
                report.problems.append(
                    Finding(split, array.basename, f"checksum mismatch in chunk {key}", None, span)
                )
            report.chunks += 1
    return _decode(array, split, array.basename, report)


def _check_offsets(
    array: zarr.Array | None, split: str, meta: dict[str, Any], report: VerifyReport, strict: bool
) -> np.ndarray | None:
    """``offsets`` maps tokens to examples; if it is wrong nothing else can be located."""
    if array is None:
        return None
    offsets = _check_example_array(array, split, report, strict)
    if offsets is None:
        return None
    problems = []
    if len(offsets) != meta["rows"] + 1:
        problems.append(f"has {len(offsets)} entries for {meta['rows']} rows (expected rows + 1)")
    if len(offsets) and (offsets[0] != 0 or offsets[-1] != meta["tokens"]):
        problems.append(f"runs {offsets[0]}..{offsets[-1]}, expected 0..{meta['tokens']}")
    if len(offsets) > 1 and (np.diff(offsets) < 0).any():
        problems.append(f"decreases at example {int(np.argmax(np.diff(offsets) < 0))}")
    for what in problems:
        report.problems.append(Finding(split, "offsets", what))
    return None if problems else offsets


def _has_crc(array: zarr.Array) -> bool:
    return any(isinstance(codec, Crc32cCodec) for codec in array.metadata.codecs)


def _shard_layout(array: zarr.Array) -> tuple[int, int] | None:
    """(chunks per shard, index bytes) for our sharding layout; None for anything else."""
    codecs = array.metadata.codecs
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return None
    codec = codecs[0]
    index_codecs = tuple(type(c) for c in codec.index_codecs)
    if (
        codec.index_location != ShardingCodecIndexLocation.end
        or index_codecs != (BytesCodec, Crc32cCodec)
        or tuple(codec.chunk_shape[1:]) != tuple(array.shape[1:])
    ):
        return None
    per_shard = array.shards[0] // codec.chunk_shape[0]
    return per_shard, 16 * per_shard + 4


def _check_token_array(
    array: zarr.Array,
    split: str,
    geometry: Geometry,
    num_tokens: int,
    needed: np.ndarray,
    done: np.ndarray,
    offsets: np.ndarray | None,
    report: VerifyReport,
    absent_may_be_fill: bool,
) -> list[Finding]:
    """Byte-level check of each shard of a token-axis array, then a full decode of it."""
    found: list[Finding] = []

    def add(what: str, lo: int, hi: int) -> None:
        found.append(Finding(split, array.basename, what, (lo, hi), _example_span(offsets, lo, hi)))

    layout = _shard_layout(array)
    chunk_tokens = geometry.chunk_tokens
    total_chunks = math.ceil(num_tokens / chunk_tokens)
    extra = (0,) * (array.ndim - 1)
    for unit in np.flatnonzero(needed):
        unit = int(unit)
        start, stop = geometry.unit_range(unit, num_tokens)
        if stop <= start:
            continue
        flagged = " (its unit is flagged done)" if done[unit] else ""
        key = array.metadata.encode_chunk_key((unit, *extra))
        blob = _raw(array, key)
        report.shards += 1
        if blob is None:
            if not absent_may_be_fill:
                add(f"shard {key} is missing{flagged}", start, stop)
            continue
        report.bytes_read += len(blob)
        broken = False
        if layout is not None:
            per_shard, index_bytes = layout
            if len(blob) < index_bytes or not _crc_ok(blob[-index_bytes:]):
                add(f"shard {key} is truncated or its index fails its checksum", start, stop)
                continue
            index = np.frombuffer(blob[-index_bytes:-4], dtype="<u8").reshape(per_shard, 2)
            for j in range(per_shard):
                chunk = unit * per_shard + j
                if chunk >= total_chunks:
                    break
                lo, hi = chunk * chunk_tokens, min((chunk + 1) * chunk_tokens, num_tokens)
                offset, length = (int(v) for v in index[j])
                report.chunks += 1
                if offset == EMPTY:
                    if not absent_may_be_fill:
                        broken = True
                        add(f"chunk {j} of shard {key} is missing", lo, hi)
                elif offset + length > len(blob) - index_bytes:
                    broken = True
                    add(f"chunk {j} of shard {key} runs past the shard's end", lo, hi)
                elif not _crc_ok(blob[offset : offset + length]):
                    broken = True
                    add(f"checksum mismatch in chunk {j} of shard {key}", lo, hi)
        if broken:
            continue
        try:
            array[start:stop]
        except Exception as exc:  # noqa: BLE001 - a decoding failure is a finding
            add(f"shard {key} cannot be decoded ({_first_line(exc)})", start, stop)
    return found


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# --- recomputation ---------------------------------------------------------------------------


def _sample(cache: Cache, n: int, seed: int) -> list[tuple[str, int]]:
    """``n`` distinct (split, example) pairs drawn over all splits, the same for one seed."""
    counts = [cache.num_examples(split) for split in cache.splits]
    total = sum(counts)
    picks = np.random.default_rng(seed).choice(total, size=min(n, total), replace=False)
    edges = np.cumsum([0, *counts])
    chosen = []
    for pick in sorted(int(p) for p in picks):
        position = int(np.searchsorted(edges, pick, side="right")) - 1
        chosen.append((cache.splits[position], pick - int(edges[position])))
    return chosen


def _load_model(cache: Cache, override: str | None, dtype, device):
    """The backbone the cache names (its id, then the path it was read from), hash-checked
    before the weights are loaded."""
    from ..backbone.frozen import load_backbone
    from ..backbone.hub import verified_model_dir

    recorded = cache.manifest["model"]
    candidates = (
        [override] if override else [recorded["model_id"], cache.manifest.get("model_path")]
    )
    path = verified_model_dir(recorded, candidates, f"cache {cache.path}", "model.weights_sha256")
    # The seq2seq route's model gives the encoder states as its cache stores them (L raw).
    net, _, _ = load_backbone(
        path, revision=recorded.get("revision"), dtype=dtype, device=device, route=cache.route
    )
    return net


def _recompute(
    cache: Cache, report: VerifyReport, n: int, seed: int, model: str | None, device: str
) -> None:
    import torch

    from ..families import get_family
    from ..runtime import compute_dtype, resolve_device

    where = resolve_device(device)  # type: ignore[arg-type]
    dtype = cache.dtype
    net = _load_model(cache, model, compute_dtype(where, dtype), where)
    accepts_types = get_family(cache.manifest["model"]["family"]).uses_token_type_ids
    worst = 0.0
    for split, i in _sample(cache, n, seed):
        start, stop = int(cache.offsets(split)[i]), int(cache.offsets(split)[i + 1])
        ids = torch.as_tensor(cache.input_ids(split, i).astype(np.int64))[None].to(where)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        types = cache.token_type_ids(split, i)
        if types is not None and accepts_types:
            inputs["token_type_ids"] = torch.as_tensor(types.astype(np.int64))[None].to(where)
        with torch.inference_mode():
            states = net(**inputs, output_hidden_states=True).hidden_states
        for layer in cache.layers:
            expected = states[layer][0].float().cpu().numpy()
            try:
                cached = cache.hidden(split, layer, i)
            except Exception:  # noqa: BLE001 - unreadable bytes are reported by the byte checks
                continue
            rms = float(np.sqrt(np.mean(np.square(expected)))) or 1.0
            # A lossy cache is held to its own documented bound, never taken for an exact one.
            tolerance = RTOL[dtype] * (np.abs(expected) + rms) + error_bound(expected, dtype)
            ratio = float(np.max(np.abs(cached - expected) / tolerance)) if expected.size else 0.0
            worst = max(worst, ratio)
            if not ratio <= 1.0:  # also catches NaN
                report.problems.append(
                    Finding(
                        split,
                        hidden_name(layer),
                        f"recomputed example {i} differs from the cache ({ratio:.3g} times the "
                        f"{dtype} tolerance)",
                        (start, stop),
                        (i, i),
                    )
                )
        report.recomputed += 1
    report.worst_ratio = worst

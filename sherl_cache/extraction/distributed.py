"""Stage one on a dask.distributed cluster: one task per write unit, any fsspec store.

The client does everything cheap and global through the same plan and store writer as
``extract()`` (``plan.execute``): it loads and tokenises every split (which fixes every
example's token offset), builds the manifest and creates (or reopens) the store. The token
axis of each split is already cut into shard-aligned *units* (``Geometry.unit_range``); each
unit not yet flagged in ``units_done`` becomes one dask task that runs the backbone over that
unit's examples and writes that unit's shards, then its flag. Nothing else writes token-axis
data, so:

* no two tasks ever write the same shard (units are disjoint shard indices), which is what
  Zarr needs from parallel writers;
* a task that dask runs again (its worker died, it was stolen) recomputes the same batches
  and rewrites the same bytes: idempotent, so a re-run needs no coordination;
* the cache is bit-identical to ``extract()``'s: same units, same length-sorted batches
  (``run_unit``), same write code (``UnitWriter``), same manifest, so either one can finish a
  cache the other started.

What a task carries is small: the split name, the unit index, its token range and the token
ids of the examples that overlap it (a few KiB; workers never re-tokenise, so they need no
data files and cannot disagree with the client's tokenizer). The backbone never travels
through the task graph: a ``WorkerPlugin`` loads it once per worker (and again on a worker
that replaces a dead one), and checks that the weights the worker sees hash to the manifest's.

Caches may live at any fsspec URL (``s3://bucket/prefix``, ``gs://``, ``file://``): the client
and every worker open the same URL with fsspec's usual configuration (for S3: the
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_ENDPOINT_URL`` variables or
``~/.aws``). ``memory://`` is per process, so it only works with threads-only clusters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from distributed import WorkerPlugin

from ..cluster import ClusterClient, cluster_client
from ..config.extract import ExtractConfig
from ..errors import CacheError, CacheMismatchError, ConfigError, NumericOverflowError
from ..runtime import resolve_device
from ..store.cache import open_store
from ..store.writer import OpenedStore, UnitRange, UnitWriter, is_url, write_error
from .engine import ExtractionModel, load_extraction_model, run_unit
from .inputs import TokenizedSplit, unit_examples
from .plan import ExtractPlan, ExtractResult, execute, plan_extraction

if TYPE_CHECKING:
    from distributed import Client

__all__ = [
    "BackbonePlugin",
    "BackboneSpec",
    "UnitJob",
    "extract_distributed",
    "extract_unit",
    "is_url",
]

CONNECT_TIMEOUT_S = 10.0


# --- what travels to the workers -----------------------------------------------------------


@dataclass(frozen=True)
class BackboneSpec:
    """How a worker loads the backbone: hashable, a few hundred bytes, never the model itself.

    ``weights_sha256`` is the manifest's; a worker whose copy of ``model`` hashes otherwise
    refuses to compute, so a cluster with a stale checkpoint somewhere cannot mix two models
    into one cache.
    """

    model: str
    revision: str | None
    dtype: str  # storage dtype; the compute dtype follows from it and the device
    device: str  # auto | cpu | cuda, resolved on each worker
    trust_remote_code: bool
    weights_sha256: str
    threads: int | None = None  # torch CPU threads per worker; None leaves torch's default

    @property
    def name(self) -> str:
        """The plugin name: one registration (and one loaded model) per distinct spec."""
        blob = repr(dataclasses.astuple(self)).encode()
        return f"sherl-cache-backbone-{hashlib.sha256(blob).hexdigest()[:16]}"


@dataclass(frozen=True)
class UnitJob:
    """One unit of one split: its token range and the token ids of the examples it overlaps.

    ``first`` is the index of the first overlapping example and ``base`` that example's global
    token offset; ``lengths`` are the examples' token counts and ``input_ids`` (and
    ``token_type_ids``) their ids, concatenated.
    """

    path: str  # absolute path or URL: workers do not share the client's working directory
    store_id: str  # the store's creation time: a re-created store never reuses opened arrays
    split: str
    unit: int
    start: int
    stop: int
    first: int
    base: int
    lengths: np.ndarray
    input_ids: np.ndarray
    token_type_ids: np.ndarray | None
    layers: tuple[int, ...]
    batch_size: int
    pad_id: int

    @classmethod
    def cut(
        cls,
        tokens: TokenizedSplit,
        offsets: np.ndarray,
        unit: int,
        start: int,
        stop: int,
        **common: Any,
    ) -> UnitJob:
        first, last = unit_examples(offsets, start, stop)
        ids = tokens.input_ids[first:last]
        types = tokens.token_type_ids[first:last] if tokens.token_type_ids is not None else None
        return cls(
            split=tokens.name,
            unit=unit,
            start=start,
            stop=stop,
            first=first,
            base=int(offsets[first]),
            lengths=np.fromiter((len(x) for x in ids), dtype=np.int32, count=len(ids)),
            input_ids=np.concatenate(ids).astype(np.int32),
            token_type_ids=None if types is None else np.concatenate(types).astype(np.int8),
            **common,
        )

    def tokens(self) -> tuple[TokenizedSplit, np.ndarray]:
        """The examples as ``run_unit`` takes them, indexed from 0, with their local offsets."""
        cuts = np.cumsum(self.lengths)[:-1]
        ids = [part.tolist() for part in np.split(self.input_ids, cuts)]
        types = (
            None
            if self.token_type_ids is None
            else [part.tolist() for part in np.split(self.token_type_ids, cuts)]
        )
        split = TokenizedSplit(self.split, ids, types, 0, None, "")
        return split, split.offsets


# --- the worker side ------------------------------------------------------------------------


_LOCK = threading.Lock()
_BACKBONES: dict[BackboneSpec, ExtractionModel] = {}
_STORES: dict[tuple[str, str], tuple[Any, dict[str, dict[str, Any]]]] = {}
_MAX_OPEN_STORES = 4


def _backbone(spec: BackboneSpec) -> ExtractionModel:
    """This worker's copy of the backbone, loaded on first use and kept for every later task."""
    with _LOCK:
        if spec in _BACKBONES:
            return _BACKBONES[spec]
        import torch
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a worker's stderr is a log, not a terminal
        if spec.threads:
            torch.set_num_threads(spec.threads)  # N processes on C cores: C/N threads each
        loaded = load_extraction_model(
            spec.model,
            revision=spec.revision,
            dtype=spec.dtype,
            device=resolve_device(spec.device),
            trust_remote_code=spec.trust_remote_code,
        )
        if loaded.info.weights_sha256 != spec.weights_sha256:
            raise CacheMismatchError(
                f"worker {socket.gethostname()} loads other weights for {spec.model!r} (sha256 "
                f"{loaded.info.weights_sha256[:12]}, the cache needs {spec.weights_sha256[:12]}); "
                "give every worker the same checkpoint"
            )
        _BACKBONES[spec] = loaded
        return loaded


def _release(spec: BackboneSpec) -> None:
    with _LOCK:
        loaded = _BACKBONES.pop(spec, None)
    if loaded is not None and loaded.device.type == "cuda":
        import torch

        del loaded
        torch.cuda.empty_cache()


def _split_arrays(path: str, store_id: str) -> tuple[Any, dict[str, dict[str, Any]]]:
    """The store and its opened arrays, kept across tasks: each open re-reads metadata, which
    on an object store is one request per array per unit."""
    with _LOCK:
        key = (path, store_id)
        if key not in _STORES:
            while len(_STORES) >= _MAX_OPEN_STORES:
                _STORES.pop(next(iter(_STORES)))
            _STORES[key] = (open_store(path, mode="r+"), {})
        return _STORES[key]


_EXAMPLE = re.compile(r"(?<= example )(\d+)")


def extract_unit(spec: BackboneSpec, job: UnitJob) -> dict[str, Any]:
    """The dask task: compute one unit on this worker's backbone and write its shards.

    Returns only a small receipt; the states themselves never leave the worker except into
    the store.
    """
    began = time.perf_counter()
    context = _backbone(spec).context(spec.dtype, job.layers, job.batch_size, job.pad_id)
    tokens, _ = job.tokens()
    local = UnitRange(job.unit, job.start - job.base, job.stop - job.base)
    try:
        unit = run_unit(context, tokens, local)
    except NumericOverflowError as exc:  # name the example by its index in the split
        raise NumericOverflowError(
            _EXAMPLE.sub(lambda m: str(int(m.group(1)) + job.first), str(exc), count=1)
        ) from None
    # Written with extract()'s own writer, so shard and flag order are the same; the opened
    # arrays are kept across this worker's tasks (see _split_arrays).
    root, opened = _split_arrays(job.path, job.store_id)
    writer = UnitWriter(root, job.layers, depth=1, opened=opened)
    writer.put(dataclasses.replace(unit, start=job.start, stop=job.stop))
    writer.close()  # waits for the write; re-raises its error
    return {
        "split": job.split,
        "unit": job.unit,
        "tokens": job.stop - job.start,
        "seconds": time.perf_counter() - began,
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }


class BackbonePlugin(WorkerPlugin):
    """Loads the backbone once on every worker, including workers that join or restart later.

    Registered under ``spec.name`` and idempotent, so a second run with the same backbone (or
    a client that reconnects after being killed) reuses the loaded model instead of reloading.
    """

    idempotent = True

    def __init__(self, spec: BackboneSpec):
        self.spec = spec
        self.name = spec.name

    def setup(self, worker) -> None:
        _backbone(self.spec)

    def teardown(self, worker) -> None:
        _release(self.spec)


# --- the client side ------------------------------------------------------------------------


def _dashboard_link(client: Client) -> str:
    try:
        return str(client.dashboard_link or "")
    except (KeyError, AttributeError, ValueError):  # no dashboard (bokeh not installed)
        return ""


def _jobs(plan: ExtractPlan, store: OpenedStore, batch_size: int) -> list[UnitJob]:
    """A job for every unit not yet flagged."""
    assert store.root is not None
    common = {
        "path": plan.path if is_url(plan.path) else os.path.abspath(plan.path),
        "store_id": str(store.root.attrs.get("created", "")),
        "layers": plan.layers,
        "batch_size": batch_size,
        "pad_id": plan.pad_id,
    }
    jobs = []
    for name, units in store.pending().items():
        tokens = plan.tokenized[name]
        for unit in units:
            jobs.append(UnitJob.cut(tokens, tokens.offsets, *unit, **common))
    return jobs


def _task_key(job: UnitJob) -> str:
    """Deterministic: the same unit of the same store is one dask task, whoever submits it."""
    store = hashlib.sha256(f"{job.path}\0{job.store_id}".encode()).hexdigest()[:16]
    return f"sherl-unit-{store}-{job.split}-{job.unit}"


def _task_error(job: UnitJob, exc: BaseException) -> BaseException:
    from distributed.scheduler import KilledWorker

    if isinstance(exc, KilledWorker):
        return CacheError(
            f"unit {job.unit} of split {job.split} killed its worker repeatedly (out of memory?); "
            "the cache stays resumable: fix the cause and re-run the same command"
        )
    return write_error(exc)


def extract_distributed(
    config: ExtractConfig,
    *,
    workers: int = 0,
    scheduler: str | None = None,
    client: Client | None = None,
    report: Callable[[str], None] = lambda _: None,
    progress: bool = True,
) -> ExtractResult:
    """Run stage one on a dask cluster; the cache is the one ``extract(config)`` would write.

    The cluster is ``client`` if given, else the scheduler at ``scheduler``, else a new local
    cluster of ``workers`` processes (one per GPU with CUDA, see ``cluster.py``). Reruns skip
    flagged units, so a run killed anywhere (client or worker) is finished by running it
    again, with or without a cluster.
    """
    if client is None and not scheduler and workers < 1:
        raise ConfigError(f"--workers must be positive, got {workers}")
    if scheduler and workers:
        raise ConfigError("pass --workers (a local cluster) or --scheduler (an existing one)")
    began = time.perf_counter()
    plan = plan_extraction(config)
    if plan.seq2seq is not None:
        raise ConfigError(
            "--route seq2seq caches are extracted in one process for now (the decoder side has "
            "no dask driver yet): run sherl-cache extract, or pass --route encoder"
        )

    def fill(store: OpenedStore) -> None:
        jobs = _jobs(plan, store, config.batch_size)
        if not jobs:
            return
        if client is None and not scheduler:
            resolve_device(config.device)  # --device cuda without CUDA fails here
        with cluster_client(
            client=client,
            scheduler=scheduler,
            workers=workers,
            device=config.device,
            timeout=CONNECT_TIMEOUT_S,
            name="sherl-cache-extract",
            tasks="units",
            report=report,
        ) as cluster:
            report(cluster.described)
            _run_jobs(cluster, jobs, store.total_units(), plan, config, progress, report)

    return execute(plan, fill, report, began, show_estimate=progress)


def _run_jobs(
    cluster: ClusterClient,
    jobs: list[UnitJob],
    total: int,
    plan: ExtractPlan,
    config: ExtractConfig,
    progress: bool,
    report: Callable[[str], None],
) -> None:
    """Load the backbone on every worker, submit one task per unit, follow them to the end."""
    from distributed import as_completed
    from tqdm.auto import tqdm

    client = cluster.client
    link = _dashboard_link(client)
    if link:
        report(f"dask dashboard: {link}")
    spec = BackboneSpec(
        model=config.model,
        revision=config.revision,
        dtype=plan.dtype,
        device=config.device,
        trust_remote_code=config.trust_remote_code,
        weights_sha256=plan.info.weights_sha256,
        threads=cluster.threads,
    )
    client.register_plugin(BackbonePlugin(spec))  # raises the first worker's load error
    resources = {"GPU": 1} if cluster.gpu else None
    futures = {
        client.submit(extract_unit, spec, job, key=_task_key(job), resources=resources): job
        for job in jobs
    }
    bar = tqdm(
        total=total,
        initial=total - len(jobs),
        desc="extract units",
        unit="unit",
        disable=not progress,
        leave=True,
    )
    try:
        for future in as_completed(futures, loop=client.loop):
            job = futures[future]
            try:
                future.result()
            except Exception as exc:
                error = _task_error(job, exc)
                if error is exc:
                    raise  # a known error (it pickles) or a bug: as the task raised it
                raise error from exc
            bar.update(1)
    finally:
        bar.close()
        client.cancel(list(futures))  # no-op for finished ones; stops queued units on error
        with contextlib.suppress(Exception):  # the cluster may be gone already
            client.unregister_worker_plugin(spec.name)

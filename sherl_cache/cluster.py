"""Dask clusters for distributed extraction and sweeps: a given client, a scheduler, or local.

Every local cluster pins GPUs one way: one worker process per visible GPU, each started with
``CUDA_VISIBLE_DEVICES`` set to its own device and ``resources={"GPU": 1}``. A worker's
``cuda`` is then its GPU with no device choice in any task, and tasks submitted with that
resource run one at a time per GPU. Without CUDA the workers are CPU processes sharing the
cores. Local clusters listen on 127.0.0.1 only and close when the block ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from distributed import Client


def connect(address: str, timeout: float = 5.0) -> Client:
    """A client of an existing scheduler, or a one-line ConfigError within ``timeout`` seconds:
    an unreachable cluster must fail before any work starts, not after a long default wait."""
    from distributed import Client

    try:
        return Client(address, timeout=timeout, set_as_default=False)
    except (OSError, ValueError, TypeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"cannot reach the dask scheduler at {address!r} (--scheduler) within {timeout:g} s: "
            f"{reason[:200]}"
        ) from None


@dataclass
class ClusterClient:
    """A client to submit to, and how to submit: tasks need ``resources={"GPU": 1}`` when
    ``gpu``; ``threads`` is the torch thread count for workers this process started."""

    client: Client
    gpu: bool
    threads: int | None
    described: str


def has_gpu_workers(client: Client) -> bool:
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    return any("GPU" in w.get("resources", {}) for w in workers.values())


def local_gpus(device: str) -> list[str]:
    """CUDA devices a local cluster may use, as CUDA_VISIBLE_DEVICES entries."""
    if device == "cpu":
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [d.strip() for d in visible.split(",") if d.strip()][: torch.cuda.device_count()]
    return [str(i) for i in range(torch.cuda.device_count())]


@contextlib.contextmanager
def local_cluster(
    workers: int,
    *,
    device: str,
    name: str,
    threads: int | None = None,
    report: Callable[[str], None] = lambda _: None,
) -> Iterator[ClusterClient]:
    """One worker process per GPU (at most ``workers``) or, without CUDA, ``workers`` CPU
    processes; ``threads`` per CPU worker defaults to an even share of the cores."""
    from distributed import Client, Nanny, Scheduler, SpecCluster

    gpus = local_gpus(device)
    if gpus and workers > len(gpus):
        report(f"--workers {workers}: only {len(gpus)} GPU(s) visible, starting {len(gpus)}")
    count = min(workers, len(gpus)) if gpus else workers
    threads = threads or max(1, (os.cpu_count() or 1) // count)
    options: dict[str, Any] = {
        "nthreads": 1,  # one task at a time per worker: the GPU (or its cores) is the resource
        "host": "127.0.0.1",
        "dashboard": False,
        "silence_logs": logging.ERROR,
    }
    specs = {
        i: {
            "cls": Nanny,
            "options": dict(
                options,
                name=i,
                resources={"GPU": 1} if gpus else None,
                env=(
                    {"CUDA_VISIBLE_DEVICES": gpus[i]} if gpus else {"OMP_NUM_THREADS": str(threads)}
                ),
            ),
        }
        for i in range(count)
    }
    cluster = SpecCluster(
        workers=specs,
        scheduler={
            "cls": Scheduler,
            "options": {
                "host": "127.0.0.1",
                "dashboard": True,
                "dashboard_address": "127.0.0.1:0",  # never exposed beyond this machine
            },
        },
        silence_logs=logging.ERROR,
        name=name,
    )
    try:
        client = Client(cluster, set_as_default=False)
        try:
            kind = "one per GPU" if gpus else f"CPU, {threads} thread(s) each"
            described = f"local cluster: {count} worker(s), {kind}"
            yield ClusterClient(client, bool(gpus), threads, described)
        finally:
            client.close()
    finally:
        cluster.close()


@contextlib.contextmanager
def cluster_client(
    *,
    client: Client | None = None,
    scheduler: str | None = None,
    workers: int = 0,
    device: str = "auto",
    timeout: float = 5.0,
    name: str = "sherl-cache",
    tasks: str = "tasks",
    threads: int | None = None,
    report: Callable[[str], None] = lambda _: None,
) -> Iterator[ClusterClient]:
    """``client`` if given (left open), else a client of ``scheduler``, else a local cluster
    of ``workers`` processes (``local_cluster``); ``tasks`` names the work in messages."""
    if client is not None:
        yield ClusterClient(client, has_gpu_workers(client), None, "the given dask client")
        return
    if scheduler:
        client = connect(scheduler, timeout)
        try:
            if not client.scheduler_info(n_workers=-1).get("workers"):
                report(f"scheduler {scheduler} has no workers yet; {tasks} wait for one")
            yield ClusterClient(client, has_gpu_workers(client), None, f"scheduler {scheduler}")
        finally:
            client.close()
        return
    with local_cluster(
        workers, device=device, name=name, threads=threads, report=report
    ) as cluster:
        yield cluster

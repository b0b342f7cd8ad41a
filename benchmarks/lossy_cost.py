"""What a smaller cache costs: fp16, bf16, int8 and fp8 caches of the packaged MiniLM on real
MRPC, each trained with the demo recipe over seeds 0, 1 and 2.

Per dtype: size on disk, extraction time, and the held-out validation metrics (mean and
standard deviation over seeds) with the training time per run. Each run chooses its epoch on
one seeded half of the validation split and is reported on the other (``--select-on auto``).
Results before 2026-11-26 evening (``results/lossy_cost.json``) chose and reported on the whole
validation split.

    python benchmarks/lossy_cost.py [--dtypes float16,bfloat16,int8,float8_e4m3] [--seeds 0,1,2]
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

try:
    from _common import MRPC, log, machine, minilm_path
except ImportError:  # imported as benchmarks.lossy_cost
    from benchmarks._common import MRPC, log, machine, minilm_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="float16,bfloat16,int8,float8_e4m3")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: temp)")
    args = parser.parse_args()

    from sherl_cache.config.extract import ExtractConfig
    from sherl_cache.config.train import TrainConfig
    from sherl_cache.extraction.extract import extract
    from sherl_cache.training.recipe import train

    model = minilm_path()
    if model is None or not Path(MRPC).is_dir():
        raise SystemExit("needs the packaged MiniLM and real MRPC data")
    host = machine()
    work = Path(tempfile.mkdtemp(prefix="sherl-lossy-", dir=args.work))
    seeds = [int(s) for s in args.seeds.split(",")]
    rows: list[dict[str, Any]] = []
    try:
        for dtype in args.dtypes.split(","):
            t0 = time.perf_counter()
            result = extract(
                ExtractConfig(
                    model=str(model),
                    task="mrpc",
                    data_dir=Path(MRPC).parent,
                    dtype=dtype,
                    cache=str(work / dtype),
                ),
                progress=False,
            )
            extract_seconds = time.perf_counter() - t0
            runs = []
            for seed in seeds:
                config = TrainConfig(
                    cache=result.path,
                    out=work / f"run-{dtype}-{seed}",
                    epochs=args.epochs,
                    batch_size=32,
                    lr=3e-3,
                    seed=seed,
                )
                metrics = train(config, progress=False).metrics
                reported = metrics["reported"]
                runs.append({"seed": seed, **reported, "seconds": metrics["train_seconds"]})
                log(f"{dtype} seed {seed}: {reported}")
            row: dict[str, Any] = {
                "dtype": dtype,
                "bytes_stored": result.bytes_stored,
                "extract_seconds": round(extract_seconds, 1),
                "runs": runs,
            }
            for name in ("accuracy", "f1"):
                values = [run[name] for run in runs]
                row[f"{name}_mean"] = round(statistics.mean(values), 4)
                row[f"{name}_std"] = round(statistics.stdev(values), 4) if len(values) > 1 else 0.0
            row["train_seconds_mean"] = round(statistics.mean(r["seconds"] for r in runs), 1)
            rows.append(row)
            shutil.rmtree(work / dtype, ignore_errors=True)
        base = next((r for r in rows if r["dtype"] == "float16"), None)
        for row in rows:
            if base:
                row["size_vs_float16"] = round(row["bytes_stored"] / base["bytes_stored"], 4)
                row["accuracy_points_vs_float16"] = round(
                    100 * (row["accuracy_mean"] - base["accuracy_mean"]), 2
                )
        out = {
            "benchmark": "lossy_cost",
            "data": "real MRPC: train 3667; validation 408 split by --selection-seed 42 into 204 "
            "to choose the epoch on and 204 reported",
            "recipe": f"train --epochs {args.epochs} --batch-size 32 --lr 3e-3, default taps",
            "seeds": seeds,
            "machine": host,
            "rows": rows,
        }
        print(json.dumps(out, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

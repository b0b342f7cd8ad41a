"""Does SHERL's closed gate stop routes that tune every layer from the cached embeddings?

The fusion adds the frozen input through ``tanh(g / 0.1)`` with g = 0 at the start, so a late
route first sees a fresh projection of its input, not the input. This runs a route twice from
the same cache and seed, as ``frontier.py`` runs it, once as built and once with the gate
started open (g = 1: tanh(10) ~ 1), and prints both held-out results as JSON.

    python benchmarks/gate_open.py --cache DIR [--late-layers 6] [--late-mode full]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

try:
    from _common import machine
except ImportError:  # imported as benchmarks.gate_open
    from benchmarks._common import machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", required=True)
    parser.add_argument("--late-layers", type=int, default=6)
    parser.add_argument("--late-mode", default="full")
    parser.add_argument("--late-lr", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/gate-open"))
    args = parser.parse_args()

    from sherl_cache.config.train import TrainConfig
    from sherl_cache.training import recipe

    built = recipe.build_model
    rows = []
    for gate in (0.0, 1.0):

        def build(*a, _gate=gate, **k):
            model = built(*a, **k)
            with torch.no_grad():
                model.fusion.gate.fill_(_gate)
            return model

        recipe.build_model = build
        config = TrainConfig(
            cache=args.cache,
            out=args.work / f"gate-{gate}",
            overwrite=True,
            late_layers=args.late_layers,
            late_mode=args.late_mode,
            late_lr=args.late_lr,
            epochs=3,
            batch_size=32,
            lr=1e-3,
            batching="bucketed",
            seed=args.seed,
        )
        metrics = recipe.train(config, progress=False).metrics
        rows.append(
            {
                "gate_start": gate,
                "reported": metrics["reported"],
                "epochs": [
                    (e["epoch"], round(e["loss"], 4), e["accuracy"]) for e in metrics["epochs"]
                ],
            }
        )
    recipe.build_model = built
    print(
        json.dumps(
            {
                "benchmark": "gate_open",
                "args": vars(args) | {"work": str(args.work)},
                "machine": machine(),
                "rows": rows,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()

"""The frontier plot from ``frontier.py`` results: held-out accuracy (mean ± std over seeds)
against peak memory, one point per route.

``sherl-cache report`` plots one study folder; the README's figure joins several studies (the
routes were run at different times, and memory in a separate pass with the same host settings
for every route), so it is drawn from their JSON instead:

    python benchmarks/frontier_plot.py --out results/frontier.png \\
        --accuracy results/frontier.json results/frontier_residual.json \\
        --memory results/frontier_memory_lean.json

A route's accuracy comes from the last ``--accuracy`` file that has it with the most seeds;
its memory from ``--memory`` (``peak_memory_MiB``), or from its accuracy row without one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def rows_by_route(files: list[Path], routes: set[str] | None = None) -> dict[str, dict[str, Any]]:
    chosen: dict[str, dict[str, Any]] = {}
    for file in files:
        for row in json.loads(file.read_text())["rows"]:
            route = row["route"]
            if routes is not None and route not in routes:
                continue
            if route not in chosen or row["seeds"] >= chosen[route]["seeds"]:
                chosen[route] = row | {"source": file.name}
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accuracy", type=Path, nargs="+", required=True)
    parser.add_argument("--memory", type=Path, default=None)
    parser.add_argument("--routes", default=None, help="comma-separated routes to draw")
    parser.add_argument(
        "--also",
        nargs=2,
        action="append",
        default=[],
        metavar=("ACCURACY", "MEMORY"),
        help="another study's rows and its memory pass, drawn labelled with its --extra flags",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    routes = set(args.routes.split(",")) if args.routes else None
    accuracy = rows_by_route(args.accuracy, routes)
    memory = rows_by_route([args.memory]) if args.memory else {}
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    points = []
    for route, row in accuracy.items():
        mem = memory.get(route, row)["peak_memory_MiB"] / 1024
        std = row["accuracy_std"] or 0.0
        colour = "tab:red" if route == "full-ft" else "tab:blue"
        ax.errorbar(mem, row["accuracy_mean"], yerr=std, marker="o", capsize=3, color=colour)
        ax.annotate(
            f"{route} (n={row['seeds']})",
            (mem, row["accuracy_mean"]),
            fontsize=7,
            xytext=(4, 3),
            textcoords="offset points",
        )
        points.append({"route": route, "GiB": round(mem, 3), "accuracy": row["accuracy_mean"]})
    for accuracy_file, memory_file in args.also:
        flags = json.loads(Path(accuracy_file).read_text()).get("extra", "")
        memory_rows = rows_by_route([Path(memory_file)])
        for route, row in rows_by_route([Path(accuracy_file)]).items():
            mem = memory_rows[route]["peak_memory_MiB"] / 1024
            label = f"{route} {flags} (n={row['seeds']})"
            ax.errorbar(
                mem,
                row["accuracy_mean"],
                yerr=row["accuracy_std"] or 0.0,
                marker="s",
                capsize=3,
                color="tab:green",
            )
            ax.annotate(
                label,
                (mem, row["accuracy_mean"]),
                fontsize=7,
                xytext=(4, -9),
                textcoords="offset points",
            )
            points.append({"route": label, "GiB": round(mem, 3), "accuracy": row["accuracy_mean"]})
    anchor = next((p for p in points if p["route"] == "full-ft"), None)
    if anchor is not None:
        ax.axvline(anchor["GiB"] / 2, ls="--", color="grey", lw=1)
        ax.annotate(
            "half of full fine-tuning's peak",
            (anchor["GiB"] / 2, ax.get_ylim()[0]),
            fontsize=7,
            color="grey",
            rotation=90,
            xytext=(-10, 4),
            textcoords="offset points",
            va="bottom",
        )
    how = "lean host settings, one epoch" if memory else "the accuracy runs"
    ax.set_xlabel(f"peak RSS above start (GiB, CPU; {how})")
    ax.set_ylabel("held-out accuracy, MRPC (mean ± std over seeds)")
    ax.set_title("MiniLM on MRPC: routes from one cache vs full fine-tuning (red)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(json.dumps({"plot": str(args.out), "points": points}, indent=1))


if __name__ == "__main__":
    main()

"""Choosing the best epoch on data that is never reported.

Picking the best of 20 epochs on the split one then reports scores the run on its own luck,
most on small tasks. The SHERL reference code avoids it, and so does every run here by
default (``--select-on auto``):

- under 10,000 training examples, a seeded half of the validation split chooses the epoch and
  the other half is reported (``validation:0.5``);
- otherwise 1,000 seeded training examples are held out of training to choose on, and the
  whole validation split is reported (``train:1000``).

The split depends on ``--selection-seed`` only, never on the trial's ``--seed``, so every trial
of a sweep chooses and reports on the same examples. ``same`` keeps the old behaviour and says
it is biased wherever it is shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config.train import AUTO_HOLDOUT, SMALL_TASK_TRAIN_EXAMPLES, SelectOn
from ..errors import ConfigError
from .features import Batch


@dataclass(frozen=True)
class Part:
    """Examples of one split: ``indices`` into it, or None for all of it."""

    split: str
    indices: np.ndarray | None
    count: int

    def describe(self) -> dict[str, Any]:
        return {"split": self.split, "examples": self.count}


@dataclass(frozen=True)
class Selection:
    """Which examples train, which choose the epoch and which are reported."""

    protocol: str  # validation:F, train:N or same
    train: Part
    select: Part
    report: Part

    @property
    def biased(self) -> bool:
        return self.protocol == "same"

    def sources(self, train: Any, evaluation: Any) -> tuple[Any, Any, Any]:
        """(train, select, report) feature sources cut from a train and an eval source;
        report is None under ``same``, whose reported figures are the selection's own."""
        select_from = train if self.protocol.startswith("train:") else evaluation
        return (
            restrict(train, self.train),
            restrict(select_from, self.select),
            None if self.biased else restrict(evaluation, self.report),
        )

    def sentence(self) -> str:
        """How the run is scored, in words for its log."""
        chosen = f"{self.select.split}[{self.select.count}]"
        if self.biased:
            return f"epoch chosen and reported on {chosen} (--select-on same: biased upward)"
        return f"epoch chosen on {chosen}, reported on {self.report.split}[{self.report.count}]"

    def describe(self) -> dict[str, Any]:
        """The record metrics.json keeps of where a run was chosen and scored."""
        return {
            "protocol": self.protocol,
            "biased": self.biased,
            "selected_on": self.select.describe(),
            "reported_on": self.report.describe(),
        }


def seeded_permutation(count: int, seed: int) -> np.ndarray:
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed)).numpy()


def plan_selection(
    select_on: SelectOn,
    train_split: str,
    n_train: int,
    eval_split: str,
    n_eval: int,
    seed: int,
) -> Selection:
    """Disjoint selection and report sets for ``--select-on``, seeded by ``seed`` alone."""
    if select_on.kind == "auto":
        small = n_train < SMALL_TASK_TRAIN_EXAMPLES
        select_on = SelectOn("validation", 0.5) if small else SelectOn("train", AUTO_HOLDOUT)
    whole_train = Part(train_split, None, n_train)
    whole_eval = Part(eval_split, None, n_eval)
    if select_on.kind == "same":
        return Selection("same", whole_train, whole_eval, whole_eval)
    if select_on.kind == "validation":
        chosen = int(n_eval * float(select_on.amount or 0))
        if not 0 < chosen < n_eval:
            raise ConfigError(
                f"--select-on validation:{select_on.amount} leaves no examples to choose or to "
                f"report on in --eval-split {eval_split!r} ({n_eval} examples)"
            )
        order = seeded_permutation(n_eval, seed)
        return Selection(
            f"validation:{select_on.amount}",
            whole_train,
            Part(eval_split, np.sort(order[:chosen]), chosen),
            Part(eval_split, np.sort(order[chosen:]), n_eval - chosen),
        )
    held = int(select_on.amount or 0)
    if held >= n_train:
        raise ConfigError(
            f"--select-on train:{held} holds out every training example of {train_split!r} "
            f"({n_train}); hold out fewer"
        )
    order = seeded_permutation(n_train, seed)
    return Selection(
        f"train:{held}",
        Part(train_split, np.sort(order[held:]), n_train - held),
        Part(train_split, np.sort(order[:held]), held),
        whole_eval,
    )


class Subset:
    """Some examples of a feature source, renumbered 0..n-1.

    An epoch order keeps the source's own (a windowed cache visits its windows in blocks) with
    the left-out examples dropped, so holding out part of a large split stays sequential.
    """

    def __init__(self, source: Any, indices: np.ndarray):
        self.source, self.indices = source, np.sort(np.asarray(indices, dtype=np.int64))
        labels = getattr(source, "labels", None)
        self.labels = None if labels is None else labels[self.indices]
        self._position = np.full(len(source), -1, dtype=np.int64)
        self._position[self.indices] = np.arange(len(self.indices))

    def __len__(self) -> int:
        return len(self.indices)

    def order(self, generator: torch.Generator) -> np.ndarray:
        if hasattr(self.source, "order"):
            full = self.source.order(generator)
        else:
            full = torch.randperm(len(self.source), generator=generator).numpy()
        positions = self._position[full]
        return positions[positions >= 0]

    def batch(self, indices: np.ndarray, device: torch.device) -> Batch:
        return self.source.batch(self.indices[np.asarray(indices)], device)

    @property
    def windows(self) -> list[tuple[int, int]] | None:
        """The source's windows in subset positions (indices are sorted), so length-bucketed
        batches of a held-out subset still stay inside one window."""
        windows = getattr(self.source, "windows", None)
        if not windows:
            return None
        spans = [tuple(np.searchsorted(self.indices, edge) for edge in w) for w in windows]
        return [(int(first), int(end)) for first, end in spans if end > first]

    def lengths(self) -> np.ndarray:
        """Tokens per example, for length-aware batching."""
        return self.source.lengths()[self.indices]


def restrict(source: Any, part: Part) -> Any:
    """``source`` limited to ``part``'s examples (itself when the part is the whole split)."""
    return source if part.indices is None or source is None else Subset(source, part.indices)


def reported_metrics(fitted: Any, selection: Selection | None) -> dict[str, Any]:
    """The figure a run is reported by: the report set's metrics at the chosen epoch (the
    chosen epoch's own metrics under ``same``; empty without a labelled eval split)."""
    if selection is None or fitted.best is None:
        return {}
    metrics = fitted.best.metrics if selection.biased else fitted.reported or {}
    return {"epoch": fitted.best.epoch, **metrics}


def result_line(metrics: dict[str, Any]) -> str:
    """A run's closing line: its reported (held-out) figures and where they come from."""
    best, reported = metrics.get("best") or {}, metrics.get("reported") or {}
    if not reported:
        return f"best epoch {best.get('epoch')} by training loss (no labelled evaluation split)"
    figures = ", ".join(f"{k} {v:.4f}" for k, v in reported.items() if k != "epoch")
    chosen, shown = metrics["selected_on"], metrics["reported_on"]
    where = f"{shown['split']}[{shown['examples']}]"
    if metrics.get("biased"):
        return f"epoch {reported['epoch']} chosen on {where} itself: {figures} (biased upward)"
    return (
        f"epoch {reported['epoch']} chosen on {chosen['split']}[{chosen['examples']}]; "
        f"held-out {where}: {figures}"
    )

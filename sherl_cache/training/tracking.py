"""Experiment tracking (``--report-to``): per-step loss and learning rate, per-epoch metrics.

TensorBoard is an optional extra; asking for it without the package installed fails before
any training starts, naming the flag and the extra to install.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from ..errors import ConfigError

TENSORBOARD_DIR = "tensorboard"


class Tracker(Protocol):
    def step(self, step: int, loss: float, lr: float) -> None: ...

    def epoch(self, epoch: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class NoTracker:
    def step(self, step: int, loss: float, lr: float) -> None:
        pass

    def epoch(self, epoch: int, values: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoard:
    """TensorBoard event files in ``<run>/tensorboard``, the tags transformers' Trainer uses."""

    def __init__(self, folder: Path, writer: Any = None) -> None:
        if writer is None:
            writer = _summary_writer()(log_dir=str(folder))
        self.writer = writer

    def step(self, step: int, loss: float, lr: float) -> None:
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/learning_rate", lr, step)

    def epoch(self, epoch: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(f"eval/{name}", value, epoch)

    def close(self) -> None:
        self.writer.close()


def _summary_writer() -> Any:
    try:
        import tensorboard  # noqa: F401  (torch's writer imports it lazily, too late to say why)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "--report-to tensorboard needs the tensorboard package: "
            "pip install 'sherl-cache[tensorboard]'"
        ) from None
    return SummaryWriter


def check_tracker(report_to: str) -> None:
    """Fail before training where the tracker asked for cannot run."""
    if report_to == "tensorboard":
        _summary_writer()


def open_tracker(report_to: str, run_folder: Path) -> Tracker:
    if report_to == "tensorboard":
        return TensorBoard(Path(run_folder) / TENSORBOARD_DIR)
    return NoTracker()

"""The run folder, mirroring ``Cache``: a typed record of what a run is, and the one place
that knows the folder's file names.

A run folder holds ``sherl_config.json`` (the ``RunRecord``), ``trainable.safetensors`` (only
the tensors that train), for a LoRA late route also ``late_adapter/`` (a standard PEFT adapter
folder of the same LoRA tensors), and ``metrics.json``, written last so that its presence marks
the run complete. The record is not called ``config.json``: to every Hugging Face tool that
name means a model config; runs written before keep loading from theirs. Light commands
(``report``) read run folders, so torch is imported only where tensors are saved or loaded.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config.train import TrainConfig
from ..errors import RunError, SherlCacheError

if TYPE_CHECKING:
    from torch import Tensor, nn

CONFIG_FILE = "sherl_config.json"
LEGACY_CONFIG_FILE = "config.json"  # the record of runs written before sherl_config.json
METRICS_FILE = "metrics.json"
CHECKPOINT = "trainable.safetensors"
ADAPTER_DIR = "late_adapter"
# PEFT's names: the adapter a LoRA route is injected under, and the prefix of saved tensors.
ADAPTER_NAME, PEFT_PREFIX = "default", "base_model.model."
# Recorded since prediction support; together they fix the features a run was trained on.
IDENTITY_FIELDS = ("backbone", "tokenizer", "max_length", "truncation_side", "dtype", "task_spec")


def tap_spec(taps: tuple[int, ...]) -> str:
    """The explicit ``--tap`` spelling of resolved taps: it resolves to the same indices."""
    return ",".join(map(str, taps))


@dataclass(frozen=True)
class RunRecord:
    """What a run is: the settings that reproduce it and the identity of the features it was
    trained on, so prediction needs only the run folder and the backbone.

    ``config`` is the resolved TrainConfig: ``tap`` spelled out as the taps it resolved to,
    ``task`` the task's name. config.json keeps the keys earlier versions wrote (``tap``: the
    list of taps, ``task``: the name), so runs written before still load.
    """

    config: TrainConfig
    taps: tuple[int, ...]
    split_index: int
    cache_key: str
    model_id: str
    model_path: str
    backbone: Mapping[str, Any]  # the cache manifest's ``model`` identity
    tokenizer: Mapping[str, Any]
    max_length: int
    truncation_side: str
    dtype: str  # the cache's storage dtype: features are rounded to it on the fly too
    task_spec: Mapping[str, Any]
    sherl_cache_version: str | None = None
    command: str | None = None

    @classmethod
    def resolved(cls, config: TrainConfig, taps: tuple[int, ...], **identity: Any) -> RunRecord:
        """The record of a run of ``config`` whose taps and task resolved as given."""
        task = identity["task_spec"]["name"]
        return cls(replace(config, tap=tap_spec(taps), task=task), tuple(taps), **identity)

    @property
    def cache(self) -> str:
        return self.config.cache

    def to_json(self) -> dict[str, Any]:
        rest = {f.name: getattr(self, f.name) for f in fields(self)[2:]}
        return self.config.to_dict() | {"tap": list(self.taps)} | rest

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunRecord:
        """Raises KeyError, TypeError or ValueError for what is not a run's config.json."""
        taps = tuple(int(t) for t in data["tap"])
        config = TrainConfig.from_dict({**data, "tap": tap_spec(taps)})
        rest = {
            f.name: data[f.name] if f.default is MISSING else data.get(f.name, f.default)
            for f in fields(cls)[2:]
        }
        return cls(config, taps, **(rest | {"split_index": int(rest["split_index"])}))


def read_json(path: Path) -> Any:
    """A JSON file's content, or None where it is missing or unreadable (a running sweep)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _read_object(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RunError(f"{file} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise RunError(f"{file} is not a JSON object")
    return data


@dataclass(frozen=True)
class RunDir:
    """A run folder: written by ``train``, read by prediction, evaluation, sweeps and reports."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config_file(self) -> Path:
        """The record: ``sherl_config.json``, or ``config.json`` in a run written before it."""
        current, legacy = self.path / CONFIG_FILE, self.path / LEGACY_CONFIG_FILE
        return legacy if legacy.is_file() and not current.is_file() else current

    @property
    def adapter_dir(self) -> Path:
        return self.path / ADAPTER_DIR

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def complete(self) -> bool:
        return self.metrics_file.is_file()

    # --- writing -----------------------------------------------------------------------------

    def prepare(self, overwrite: bool) -> None:
        """An empty folder to train into; an existing run is replaced only with ``overwrite``."""
        if self.path.exists() and any(self.path.iterdir()):
            if not overwrite:
                raise RunError(
                    f"--out {self.path} already holds a run; choose another --out or pass "
                    "--overwrite"
                )
            for file in (self.metrics_file, self.checkpoint, *self._records()):
                file.unlink(missing_ok=True)
            shutil.rmtree(self.adapter_dir, ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)

    def _records(self) -> tuple[Path, Path]:
        return self.path / CONFIG_FILE, self.path / LEGACY_CONFIG_FILE

    def write_record(self, record: RunRecord) -> None:
        (self.path / CONFIG_FILE).write_text(json.dumps(record.to_json(), indent=2))

    def save_checkpoint(self, state: Mapping[str, Tensor], lora: Any = None) -> None:
        """The trainable tensors; with ``lora`` (the route's ``LoraConfig``) also the PEFT
        adapter folder."""
        from safetensors.torch import save_file

        save_file(dict(state), str(self.checkpoint))
        if lora is not None:
            self.save_adapter(lora, state)

    def save_adapter(self, lora: Any, state: Mapping[str, Tensor]) -> None:
        """The LoRA tensors as PEFT saves them, so ``PeftModel.from_pretrained(late, folder)``
        puts them on the rebuilt late layers (``backbone.late.build_late_route``)."""
        from safetensors.torch import save_file

        marker = f".{ADAPTER_NAME}."
        tensors = {
            PEFT_PREFIX + name.removeprefix("late.").replace(marker, "."): tensor.contiguous()
            for name, tensor in state.items()
            if name.startswith("late.") and "lora_" in name
        }
        self.adapter_dir.mkdir(exist_ok=True)
        lora.save_pretrained(str(self.adapter_dir))
        save_file(tensors, str(self.adapter_dir / "adapter_model.safetensors"), {"format": "pt"})

    def write_metrics(self, metrics: Mapping[str, Any]) -> None:
        """Written last: its presence marks the run complete."""
        self.metrics_file.write_text(json.dumps(metrics, indent=2))

    # --- reading -----------------------------------------------------------------------------

    def read_metrics(self) -> dict[str, Any] | None:
        """metrics.json of a complete run; None while it runs or where it failed."""
        metrics = read_json(self.metrics_file)
        return metrics if isinstance(metrics, dict) else None

    def read_record(self) -> RunRecord | None:
        """The record, or None where config.json is missing or not a run's."""
        data = read_json(self.config_file)
        try:
            return RunRecord.from_json(data) if isinstance(data, dict) else None
        except (KeyError, TypeError, ValueError):
            return None

    def open(self) -> tuple[RunRecord, dict[str, Any]]:
        """Record and metrics of a finished run, or the one line saying what is wrong."""
        path = self.path
        if not path.is_dir():
            raise RunError(f"no run folder {path}")
        if not self.config_file.is_file():
            raise RunError(
                f"{path} has no {CONFIG_FILE}: not a run folder written by sherl-cache train"
            )
        if not self.checkpoint.is_file():
            raise RunError(f"run {path} has no checkpoint {CHECKPOINT}; re-run sherl-cache train")
        if not self.metrics_file.is_file():
            raise RunError(
                f"run {path} is incomplete (no {METRICS_FILE}: training did not finish); "
                "re-run sherl-cache train"
            )
        data = self._with_identity(_read_object(self.config_file))
        metrics = _read_object(self.metrics_file)
        try:
            return RunRecord.from_json(data), metrics
        except (KeyError, TypeError, ValueError) as exc:
            raise RunError(f"{self.config_file} is not a sherl-cache run config ({exc})") from None

    def _with_identity(self, data: dict[str, Any]) -> dict[str, Any]:
        """Runs trained before config.json recorded the feature identity: take it from their
        cache."""
        if all(name in data for name in IDENTITY_FIELDS):
            return data
        from ..store.cache import open_cache

        try:
            manifest = open_cache(str(data.get("cache"))).manifest
        except SherlCacheError:
            raise RunError(
                f"run {self.path} predates prediction support (config.json lacks field "
                f"backbone) and its cache {data.get('cache')} is gone; re-run sherl-cache train"
            ) from None
        return {
            "backbone": manifest["model"],
            "tokenizer": manifest["tokenizer"],
            "max_length": manifest["max_length"],
            "truncation_side": manifest["truncation_side"],
            "dtype": manifest["dtype"],
            "task_spec": manifest["task"],
        } | data

    def load_checkpoint(self, model: nn.Module) -> None:
        """Load the trainable tensors; any tensor missing, extra or misshapen is refused."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        file = self.checkpoint
        try:
            state = load_file(str(file))
        except (SafetensorError, OSError) as exc:
            raise RunError(f"cannot read checkpoint {file} ({exc})") from None
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        missing = sorted(trainable - set(state))
        unexpected = sorted(set(state) - set(model.state_dict()))
        if missing or unexpected:
            example = (missing or unexpected)[0]
            raise RunError(
                f"checkpoint {file} does not fit the run's config.json ({len(missing)} tensor(s) "
                f"missing, {len(unexpected)} unexpected, e.g. {example})"
            )
        try:
            model.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[-1].strip()
            raise RunError(
                f"checkpoint {file} does not fit the run's config.json ({first})"
            ) from None

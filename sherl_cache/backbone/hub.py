"""Where a backbone lives and which weights it is: hub ids and local folders, safetensors
files, and the weights hash that caches and runs record to detect a changed model later."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from ..errors import CacheMismatchError, ModelLoadError
from ..families import Family, family_of

__all__ = [
    "BackboneInfo",
    "backbone_parameter_count",
    "checkpoint_keys",
    "inspect_backbone",
    "load_config",
    "resolve_model_dir",
    "verified_model_dir",
]

_HASH_BLOCK = 8 * 1024 * 1024
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files a backbone needs; skips the duplicate .bin/.h5/.onnx weights many hub repos also carry.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]


@dataclass(frozen=True)
class BackboneInfo:
    """The identity of a backbone as recorded in caches and runs, to detect mismatches later."""

    model_id: str
    path: str
    family: str
    architecture: str
    hidden_size: int
    num_layers: int
    revision: str | None
    weights_sha256: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _looks_like_path(model: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else must be a folder, never a download."""
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model


def resolve_model_dir(model: str, revision: str | None = None) -> tuple[Path, str | None]:
    """Local folder, or hub id from the HF cache (downloading only if missing and online).

    Returns the folder and, for hub ids, the snapshot's commit hash: the cache records it so a
    later run can tell that "the same model name" now means different weights.
    """
    local = Path(model).expanduser()
    if local.is_dir():
        return local.resolve(), None
    if local.exists():
        raise ModelLoadError(f"model {model!r} (--model) is a file; pass the model folder")
    if _looks_like_path(model):
        raise ModelLoadError(f"model folder {model!r} (--model) does not exist")

    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        try:
            folder = snapshot_download(model, revision=revision, local_files_only=True)
        except LocalEntryNotFoundError:
            if constants.HF_HUB_OFFLINE:
                raise
            folder = snapshot_download(model, revision=revision, allow_patterns=_HUB_PATTERNS)
    except Exception as exc:  # any hub failure is the same user-facing problem
        raise ModelLoadError(
            f"cannot find model {model!r} (--model): not a local folder, not in the Hugging Face "
            f"cache and not downloadable ({type(exc).__name__})"
        ) from exc
    path = Path(folder)
    # Snapshot folders are named by the commit they hold.
    commit = path.name if path.parent.name == "snapshots" else None
    return path, commit


def load_config(path: Path, model: str, trust_remote_code: bool = False) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # missing/invalid config.json or unknown model_type
        raise ModelLoadError(f"cannot read the config of model {model!r} (--model): {exc}") from exc


def _safetensors_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files (every shard of a sharded save); [] if there are none."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    single = path / SINGLE_FILE
    return [single] if single.is_file() else []


def _weight_files(path: Path) -> list[Path]:
    files = _safetensors_files(path) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise ModelLoadError(f"no weight files (model.safetensors) in model folder {path}")
    return files


@lru_cache(maxsize=64)
def _sha256_cached(files: tuple[Path, ...], stamps: tuple[tuple[int, int, int], ...]) -> str:
    """Hash once per file version: multi-GB checkpoints take seconds to read."""
    del stamps  # only part of the cache key
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as handle:
            while block := handle.read(_HASH_BLOCK):
                digest.update(block)
    return digest.hexdigest()


def _weights_sha256(path: Path) -> str:
    files = tuple(sorted(_weight_files(path), key=lambda f: f.name))
    stamps = tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in (f.stat() for f in files))
    return _sha256_cached(files, stamps)


def backbone_info(
    model: str, path: Path, revision: str | None, config: PretrainedConfig
) -> BackboneInfo:
    family = family_of(config)
    architectures = getattr(config, "architectures", None) or [config.model_type]
    return BackboneInfo(
        model_id=model,
        path=str(path),
        family=family.name,
        architecture=architectures[0],
        hidden_size=int(config.hidden_size),
        num_layers=int(config.num_hidden_layers),
        revision=revision,
        weights_sha256=_weights_sha256(path),
    )


def inspect_backbone(model: str, revision: str | None = None) -> BackboneInfo:
    """Describe a backbone from its config and weight bytes, without building it."""
    path, commit = resolve_model_dir(model, revision)
    return backbone_info(model, path, commit, load_config(path, model))


def checkpoint_keys(path: Path) -> dict[str, Path]:
    """Every tensor name in the checkpoint -> the file holding it, reading only headers."""
    from safetensors import safe_open

    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    single = path / SINGLE_FILE
    if not single.is_file():
        hint = (
            " (only .bin weights: re-save with safe_serialization)"
            if any(path.glob("*.bin"))
            else ""
        )
        raise ModelLoadError(f"no model.safetensors in model folder {path} (--model){hint}")
    with safe_open(single, framework="pt") as handle:
        return dict.fromkeys(handle.keys(), single)


def backbone_parameter_count(model_path: str | Path, family: Family, *, whole: bool = False) -> int:
    """Parameters of the cached backbone, from safetensors headers (no tensor is read);
    ``whole``: every tensor of the checkpoint (the seq2seq route uses its decoder too)."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name, file in checkpoint_keys(Path(model_path)).items():
        if whole or not name.startswith(family.outside_backbone):
            by_file.setdefault(file, []).append(name)
    total = 0
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt") as handle:
            total += sum(math.prod(handle.get_slice(name).get_shape()) for name in names)
    return total


def verified_model_dir(
    recorded: Mapping[str, Any],
    candidates: Sequence[str | None],
    owner: str,
    field_name: str,
) -> str:
    """The folder of the first candidate model that loads, refused unless its weights hash
    equals the recorded one: late layers (and, for prediction, the lower ones) must be the
    exact weights the features were computed with.

    ``recorded`` is a manifest's ``model`` identity; ``owner`` names the cache or run in
    messages, ``field_name`` the recorded field a mismatch is reported against.
    """
    last_error: Exception | None = None
    for candidate in filter(None, candidates):
        try:
            info = inspect_backbone(candidate, recorded.get("revision"))
        except Exception as exc:  # noqa: BLE001 - try the next candidate, report the last
            last_error = exc
            continue
        if info.weights_sha256 != recorded["weights_sha256"]:
            raise CacheMismatchError(
                f"model {candidate!r} is not the one {owner} was made with "
                f"(field {field_name}: recorded {recorded['weights_sha256'][:12]}…, "
                f"model has {info.weights_sha256[:12]}…); pass --model with the original, or "
                f"make a cache of this model: sherl-cache extract --model {candidate} ..."
            )
        return info.path
    raise CacheMismatchError(
        f"cannot find the weights of {recorded['model_id']!r} that {owner} was made "
        f"with ({last_error}); pass --model PATH"
    )

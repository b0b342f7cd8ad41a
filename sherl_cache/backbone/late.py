"""The late route read from a checkpoint: the last k layers and the family's extras, with only
the tensors they need read from safetensors, so a large checkpoint never has to fit in memory."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn
from transformers import PretrainedConfig

from ..errors import ConfigError, ModelLoadError
from ..families import Family, LateRoute, family_of
from .hub import checkpoint_keys, load_config, resolve_model_dir

__all__ = ["build_late_route", "build_seq2seq_route", "load_late_state_dict"]


def _check_k(k: int, num_layers: int, model: str | Path) -> None:
    if not 1 <= k <= num_layers:
        raise ConfigError(
            f"--late-layers must be between 1 and {num_layers} (the layers of {str(model)!r}), "
            f"got {k}"
        )


def _route_names(family: Family, config: PretrainedConfig, k: int) -> dict[str, str]:
    """Checkpoint prefix (without base-model prefix) -> route prefix, for all needed tensors."""
    total = config.num_hidden_layers
    names = {
        f"{family.stack}{index}.": f"layers.{slot}."
        for slot, index in enumerate(range(total - k, total))
    }
    names.update(family.extra_tensors(config))
    return names


def _base_prefix(family: Family, keys: Sequence[str], path: Path) -> str:
    """The base-model prefix of a checkpoint: "" for BertModel, "bert." for BertFor..., etc."""
    pattern = re.compile(rf"^(.*?){re.escape(family.stack)}\d+\.")
    prefixes = {m.group(1) for key in keys if (m := pattern.match(key))}
    if len(prefixes) != 1:
        found = "none" if not prefixes else ", ".join(sorted(prefixes))
        raise ModelLoadError(
            f"cannot locate the {family.name} layers ({family.stack}N.*) in {path}: "
            f"prefixes found: {found}"
        )
    return prefixes.pop()


def _late_tensors(
    located: dict[str, Path], path: Path, family: Family, config: PretrainedConfig, k: int
) -> dict[str, str]:
    """Checkpoint tensor name -> route parameter name, for exactly the tensors the route needs."""
    base = _base_prefix(family, list(located), path)
    # Longest prefix first: T5 block 0's bias belongs to the extras even when block 0 is a layer.
    prefixes = sorted(_route_names(family, config, k).items(), key=lambda p: -len(p[0]))
    mapping: dict[str, str] = {}
    for name in located:
        if not name.startswith(base):
            continue
        local = name[len(base) :]
        for source, target in prefixes:
            if local.startswith(source):
                mapping[name] = target + local[len(source) :]
                break
    return mapping


def _read_tensors(located: dict[str, Path], names: Sequence[str]) -> dict[str, Tensor]:
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(located[name], []).append(name)
    tensors: dict[str, Tensor] = {}
    for file, file_names in by_file.items():
        with safe_open(file, framework="pt") as handle:
            for name in file_names:
                tensors[name] = handle.get_tensor(name)
    return tensors


def load_late_state_dict(
    model: str | Path, k: int, *, revision: str | None = None
) -> dict[str, Tensor]:
    """The checkpoint tensors the last ``k`` layers need, keyed by their checkpoint names.

    Reads them one by one from safetensors; embeddings, lower layers and heads stay on disk.
    """
    path, _ = resolve_model_dir(str(model), revision)
    config = load_config(path, str(model))
    family = family_of(config)
    _check_k(k, config.num_hidden_layers, model)
    located = checkpoint_keys(path)
    return _read_tensors(located, list(_late_tensors(located, path, family, config, k)))


def build_late_route(
    model: str | Path,
    k: int,
    *,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> LateRoute:
    """The last ``k`` layers of ``model`` with pre-trained weights, on CPU, trainable."""
    path, _ = resolve_model_dir(str(model), revision)
    config = load_config(path, str(model))
    family = family_of(config)
    _check_k(k, config.num_hidden_layers, model)
    located = checkpoint_keys(path)
    mapping = _late_tensors(located, path, family, config, k)
    tensors = _read_tensors(located, list(mapping))
    # Built on the meta device: random init of large layers is wasted work before loading.
    with torch.device("meta"):
        route = LateRoute(family, family.route_config(config), config.num_hidden_layers, k)
    state = {mapping[name]: tensor.to(dtype) for name, tensor in tensors.items()}
    expected = set(route.state_dict())
    missing = sorted(expected - set(state))
    if missing:
        raise ModelLoadError(
            f"checkpoint {path} lacks {len(missing)} late-route tensor(s), e.g. {missing[0]}"
        )
    route.load_state_dict(state, strict=True, assign=True)
    route.extras.update(family.computed_extras(route.config))
    return route


def build_seq2seq_route(
    model: str | Path, *, revision: str | None = None, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """The frozen end of the seq2seq route (the family's: T5's last decoder block, its
    position bias and LM head) with pre-trained weights, read alone from safetensors."""
    path, _ = resolve_model_dir(str(model), revision)
    config = load_config(path, str(model))
    family = family_of(config)
    prefixes = sorted(family.seq2seq_route_tensors(config).items(), key=lambda p: -len(p[0]))
    located = checkpoint_keys(path)
    mapping: dict[str, str] = {}
    for name in located:
        for source, target in prefixes:
            if name.startswith(source):
                mapping[name] = target + name[len(source) :]
                break
    with torch.device("meta"):
        route = family.build_seq2seq_route(config)
    state = {
        mapping[name]: t.to(dtype) for name, t in _read_tensors(located, list(mapping)).items()
    }
    missing = sorted(set(route.state_dict()) - set(state))
    if missing:
        raise ModelLoadError(
            f"checkpoint {path} lacks {len(missing)} seq2seq-route tensor(s), e.g. {missing[0]}"
        )
    route.load_state_dict(state, strict=True, assign=True)
    return route

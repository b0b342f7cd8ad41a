"""Frozen backbones and their trainable late route, for each supported model family.

SHERL runs the backbone once to cache its hidden states, then trains only on top of them: the
last k pre-trained layers (the "late route") must therefore be rebuilt on their own, from the
checkpoint, and reproduce exactly what the full model computes from hidden state L-k. Layers
come from transformers' own classes so the maths cannot drift from the reference model; only
tensors the route needs are read, so a large checkpoint never has to fit in memory whole.

Everything that differs between families lives in one ``Family`` subclass each, registered in
``_FAMILIES``; supporting a new family (e.g. Llama) means writing one more subclass.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import safe_open
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, T5EncoderModel
from transformers.models.bert.modeling_bert import BertLayer
from transformers.models.roberta.modeling_roberta import RobertaLayer
from transformers.models.t5.modeling_t5 import T5Attention, T5Block, T5LayerNorm

from .errors import ConfigError, ModelLoadError

__all__ = [
    "FAMILIES",
    "BackboneInfo",
    "LateRoute",
    "build_late_route",
    "inspect_backbone",
    "load_backbone",
    "load_late_state_dict",
    "load_tokenizer",
    "resolve_model_dir",
    "run_lower_layers",
]

_HASH_BLOCK = 8 * 1024 * 1024
_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"
# Files a backbone needs; skips the duplicate .bin/.h5/.onnx weights many hub repos also carry.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]
# One attention kernel for every rebuilt layer, so the additive float mask below always applies.
_ATTN_IMPLEMENTATION = "sdpa"


# --------------------------------------------------------------------------------------------
# Families


class Family(ABC):
    """What one backbone family needs: how to load it, where its layers live, how to run them."""

    name: ClassVar[str]
    # Checkpoint path of the layer list (after any base-model prefix), e.g. "encoder.layer.".
    stack: ClassVar[str]

    def encoder_config(self, config: PretrainedConfig) -> PretrainedConfig:
        """A private copy set to the attention kernel the route's additive masks are built for."""
        config = copy.deepcopy(config)
        config._attn_implementation = _ATTN_IMPLEMENTATION
        return config

    @abstractmethod
    def load_model(self, path: Path, *, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
        """The headless model whose ``hidden_states`` are cached."""

    @abstractmethod
    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The transformer layer list of a model returned by ``load_model``."""

    @abstractmethod
    def build_layer(self, config: PretrainedConfig, index: int) -> nn.Module:
        """One layer as the full model builds it at ``index`` (on whatever device is current)."""

    def build_extras(self, config: PretrainedConfig) -> dict[str, nn.Module]:
        """Modules besides the layers the route needs (final norm, position bias, ...)."""
        return {}

    def extra_tensors(self, config: PretrainedConfig) -> dict[str, str]:
        """Checkpoint name prefix -> route name prefix, for the tensors of ``build_extras``."""
        return {}

    @abstractmethod
    def run(self, route: LateRoute, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """Apply the route's layers (and extras) the way the full model's forward does."""


def _additive_mask(attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, T) 1/0 mask -> (B, 1, 1, T) of 0 / dtype min, which both eager and sdpa add to scores."""
    keep = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - keep) * torch.finfo(dtype).min


class BertFamily(Family):
    """BERT-style post-norm encoders: no final norm, absolute positions already in the states."""

    name = "bert"
    stack = "encoder.layer."
    layer_class: ClassVar[type[nn.Module]] = BertLayer

    def load_model(self, path: Path, *, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
        # AutoModel maps a task checkpoint (BertFor...) to the bare encoder, dropping its head.
        return AutoModel.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.encoder.layer

    def build_layer(self, config: PretrainedConfig, index: int) -> nn.Module:
        return self.layer_class(config, layer_idx=index)

    def run(self, route: LateRoute, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        mask = _additive_mask(attention_mask, hidden.dtype)
        for layer in route.layers:
            hidden = layer(hidden, mask)
        return hidden


class RobertaFamily(BertFamily):
    """Same layer maths as BERT; only the class (and checkpoint prefix) differ."""

    name = "roberta"
    layer_class = RobertaLayer


class _T5PositionBias(nn.Module):
    """Block 0's relative-position table alone: T5 shares it with every later block.

    Borrows ``T5Attention.compute_bias`` instead of building a whole attention module, whose
    q/k/v/o projections the route would never use.
    """

    _relative_position_bucket = staticmethod(T5Attention._relative_position_bucket)
    compute_bias = T5Attention.compute_bias

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.is_decoder = False  # bidirectional buckets, as in the encoder
        self.relative_attention_num_buckets = config.relative_attention_num_buckets
        self.relative_attention_max_distance = config.relative_attention_max_distance
        self.relative_attention_bias = nn.Embedding(
            config.relative_attention_num_buckets, config.num_heads
        )


class T5Family(Family):
    """T5's encoder stack: pre-norm blocks, shared relative position bias, final RMS norm."""

    name = "t5"
    stack = "encoder.block."
    _bias_tensor = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias."

    def encoder_config(self, config: PretrainedConfig) -> PretrainedConfig:
        config = super().encoder_config(config)
        config.is_decoder = False  # a seq2seq config describes the decoder too
        config.use_cache = False
        return config

    def load_model(self, path: Path, *, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
        # The encoder alone: the decoder of a T5ForConditionalGeneration checkpoint is ignored.
        return T5EncoderModel.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code
        )

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.encoder.block

    def build_layer(self, config: PretrainedConfig, index: int) -> nn.Module:
        # Later blocks receive the bias instead of owning it, even when the route starts at 0.
        return T5Block(config, has_relative_attention_bias=False, layer_idx=index)

    def build_extras(self, config: PretrainedConfig) -> dict[str, nn.Module]:
        return {
            "position_bias": _T5PositionBias(config),
            "final_norm": T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon),
            "final_dropout": nn.Dropout(config.dropout_rate),
        }

    def extra_tensors(self, config: PretrainedConfig) -> dict[str, str]:
        return {
            self._bias_tensor: "extras.position_bias.relative_attention_bias.",
            "encoder.final_layer_norm.": "extras.final_norm.",
        }

    def run(self, route: LateRoute, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        length = hidden.shape[1]
        bias = route.extras["position_bias"].compute_bias(length, length, device=hidden.device)
        bias = bias.to(hidden.dtype)
        mask = _additive_mask(attention_mask, hidden.dtype)
        for block in route.layers:
            hidden = block(hidden, attention_mask=mask, position_bias=bias)[0]
        return route.extras["final_dropout"](route.extras["final_norm"](hidden))


_FAMILIES: dict[str, Family] = {f.name: f for f in (BertFamily(), RobertaFamily(), T5Family())}
FAMILIES: tuple[str, ...] = tuple(_FAMILIES)


def _family_of(config: PretrainedConfig) -> Family:
    family = _FAMILIES.get(config.model_type)
    if family is None:
        raise ModelLoadError(
            f"unsupported architecture {config.model_type!r} (--model): "
            f"supported: {', '.join(FAMILIES)}"
        )
    return family


# --------------------------------------------------------------------------------------------
# Locating a model and describing it


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


def _load_config(path: Path, model: str, trust_remote_code: bool = False) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # missing/invalid config.json or unknown model_type
        raise ModelLoadError(f"cannot read the config of model {model!r} (--model): {exc}") from exc


def _safetensors_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files (every shard of a sharded save); [] if there are none."""
    index = path / _INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    single = path / _SINGLE_FILE
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


def _info(model: str, path: Path, revision: str | None, config: PretrainedConfig) -> BackboneInfo:
    family = _family_of(config)
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
    return _info(model, path, commit, _load_config(path, model))


# --------------------------------------------------------------------------------------------
# The frozen backbone


def load_tokenizer(model_dir: str | Path, trust_remote_code: bool = False) -> Any:
    """The model's own tokenizer, so cached token positions match what the backbone saw."""
    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except Exception as exc:  # missing vocab / tokenizer files
        raise ModelLoadError(
            f"cannot load the tokenizer of {str(model_dir)!r} (--model): {exc}"
        ) from exc


def load_backbone(
    model: str,
    *,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> tuple[nn.Module, Any, BackboneInfo]:
    """The frozen, headless extraction model, its tokenizer and its identity.

    Call it with ``output_hidden_states=True``: ``hidden_states`` has L+1 entries, the last one
    after any final norm (what the late route reproduces).
    """
    path, commit = resolve_model_dir(model, revision)
    config = _load_config(path, model, trust_remote_code)
    info = _info(model, path, commit, config)
    family = _FAMILIES[info.family]
    try:
        net = family.load_model(path, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as exc:  # corrupt or incompatible weights
        raise ModelLoadError(f"cannot load model {model!r} (--model): {exc}") from exc
    net.eval().requires_grad_(False).to(device)
    return net, load_tokenizer(path, trust_remote_code), info


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once the needed states are recorded."""


def run_lower_layers(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    num_layers: int,
    token_type_ids: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """``hidden_states[0..num_layers]`` of a ``load_backbone`` model, skipping the layers above.

    Predicting without a cache needs only the states the late route and fusion consume;
    stopping the forward at the input of layer ``num_layers`` (via hooks, so each family's
    embedding and mask code is reused) saves the k late layers' compute.
    """
    family = _family_of(model.config)
    layers = family.layers(model)
    if not 0 <= num_layers <= len(layers):
        raise ConfigError(f"num_layers must be in 0..{len(layers)}, got {num_layers}")
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if token_type_ids is not None:  # BERT-style pairs embed their segment ids
        inputs["token_type_ids"] = token_type_ids
    if num_layers == len(layers):
        return tuple(model(**inputs, output_hidden_states=True).hidden_states)

    states: list[Tensor] = []

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        states.append(args[0] if args else kwargs["hidden_states"])
        if len(states) > num_layers:
            raise _StopForward

    handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
    try:
        model(**inputs)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return tuple(states)


# --------------------------------------------------------------------------------------------
# The late route


class LateRoute(nn.Module):
    """The last k pre-trained layers (plus the family's final norm) as a standalone module.

    Input is hidden state ``first_layer = L - k`` as cached; output equals the backbone's
    ``hidden_states[L]``. Train mode applies the config's dropout like the full model does.
    """

    def __init__(self, family: Family, config: PretrainedConfig, num_layers: int, k: int) -> None:
        super().__init__()
        self.family = family
        self.config = config
        self.num_layers = num_layers
        self.k = k
        self.first_layer = num_layers - k
        self.layers = nn.ModuleList(
            family.build_layer(config, index) for index in range(self.first_layer, num_layers)
        )
        self.extras = nn.ModuleDict(family.build_extras(config))

    def forward(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """hidden (B, T, d) and attention_mask (B, T), 1 for real tokens, 0 for padding."""
        return self.family.run(self, hidden, attention_mask)


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


def _checkpoint_keys(path: Path) -> dict[str, Path]:
    """Every tensor name in the checkpoint -> the file holding it, reading only headers."""
    index = path / _INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    single = path / _SINGLE_FILE
    if not single.is_file():
        hint = (
            " (only .bin weights: re-save with safe_serialization)"
            if any(path.glob("*.bin"))
            else ""
        )
        raise ModelLoadError(f"no model.safetensors in model folder {path} (--model){hint}")
    with safe_open(single, framework="pt") as handle:
        return dict.fromkeys(handle.keys(), single)


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
    config = _load_config(path, str(model))
    family = _family_of(config)
    _check_k(k, config.num_hidden_layers, model)
    located = _checkpoint_keys(path)
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
    config = _load_config(path, str(model))
    family = _family_of(config)
    _check_k(k, config.num_hidden_layers, model)
    located = _checkpoint_keys(path)
    mapping = _late_tensors(located, path, family, config, k)
    tensors = _read_tensors(located, list(mapping))
    # Built on the meta device: random init of large layers is wasted work before loading.
    with torch.device("meta"):
        route = LateRoute(family, family.encoder_config(config), config.num_hidden_layers, k)
    state = {mapping[name]: tensor.to(dtype) for name, tensor in tensors.items()}
    expected = set(route.state_dict())
    missing = sorted(expected - set(state))
    if missing:
        raise ModelLoadError(
            f"checkpoint {path} lacks {len(missing)} late-route tensor(s), e.g. {missing[0]}"
        )
    route.load_state_dict(state, strict=True, assign=True)
    return route

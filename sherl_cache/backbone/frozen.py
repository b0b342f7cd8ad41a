"""The frozen backbone as stage one runs it: the model, its tokenizer, and a forward pass that
stops at the split for prediction without a cache."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoTokenizer

from ..errors import ConfigError, ModelLoadError
from ..families import Family, family_of
from .hub import BackboneInfo, backbone_info, load_config, resolve_model_dir

__all__ = ["load_backbone", "load_tokenizer", "run_lower_layers", "tokenizer_identity"]


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
    route: str = "encoder",
) -> tuple[nn.Module, Any, BackboneInfo]:
    """The frozen, headless extraction model, its tokenizer and its identity.

    Call it with ``output_hidden_states=True``: ``hidden_states`` has L+1 entries, the last one
    after any final norm (what the late route reproduces). For ``route="seq2seq"`` the model is
    the family's seq2seq backbone (its encoder's index L is the last block's raw output).
    """
    path, commit = resolve_model_dir(model, revision)
    config = load_config(path, model, trust_remote_code)
    info = backbone_info(model, path, commit, config)
    family = family_of(config)
    try:
        net = family.load_route_model(path, route, dtype=dtype, trust_remote_code=trust_remote_code)
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
    family = family_of(model.config)
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


def tokenizer_identity(tokenizer: Any, model_dir: Path, family: Family) -> dict[str, Any]:
    """What identifies a tokenizer in a manifest: class, size and a hash of its vocabulary."""
    digest = hashlib.sha256()
    for name in family.tokenizer_files:
        path = Path(model_dir) / name
        if path.is_file():
            digest.update(name.encode() + path.read_bytes())
    return {
        "name": str(getattr(tokenizer, "name_or_path", "")),
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "files_sha256": digest.hexdigest(),
        "padding_side": "right",
    }

"""Llama-style decoders: pre-norm layers with rotary positions and a final RMS norm.

Llama (2, 3 and the checkpoints that load as Llama), Mistral, Qwen2, Qwen3 and Phi-3 share
this layout in transformers (``model.layers``, ``model.norm``, a rotary embedding module whose
tables are computed from the config, not stored); they differ only in their classes and
projection names. The rotary tables of the late route are computed for each example's
positions 0..n-1, as the full model computes them for right-padded batches.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig

from .base import LateRoute
from .decoder import CausalFamily, layer_masks

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class RotaryFamily(CausalFamily):
    """A decoder whose classes are ``<prefix>DecoderLayer``, ``<prefix>RotaryEmbedding`` and
    ``<prefix>RMSNorm`` in ``transformers.models.<model_type>``."""

    stack = "layers."

    def __init__(
        self, model_type: str, class_prefix: str, lora_targets: tuple[str, ...] = LLAMA_PROJECTIONS
    ) -> None:
        self.name = model_type
        self.model_types = (model_type,)
        self.class_prefix = class_prefix
        self.lora_targets = lora_targets

    def _class(self, kind: str) -> Any:
        module = importlib.import_module(
            f"transformers.models.{self.model_types[0]}.modeling_{self.model_types[0]}"
        )
        return getattr(module, f"{self.class_prefix}{kind}")

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.layers

    def build_layer(self, config: PretrainedConfig, index: int) -> nn.Module:
        return self._class("DecoderLayer")(config, layer_idx=index)

    def build_extras(self, config: PretrainedConfig) -> dict[str, nn.Module]:
        return {"final_norm": self._class("RMSNorm")(config.hidden_size, eps=config.rms_norm_eps)}

    def computed_extras(self, config: PretrainedConfig) -> dict[str, nn.Module]:
        return {"rotary": self._class("RotaryEmbedding")(config=config)}

    def extra_tensors(self, config: PretrainedConfig) -> dict[str, str]:
        return {"norm.": "extras.final_norm."}

    def run(self, route: LateRoute, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        batch, length = attention_mask.shape
        positions = torch.arange(length, device=hidden.device).expand(batch, length)
        rotary = route.extras["rotary"](hidden, positions)
        masks = layer_masks(self, route.config, route.first_layer, attention_mask, hidden.dtype)
        for layer, mask in zip(route.layers, masks, strict=True):
            hidden = layer(
                hidden, attention_mask=mask, position_ids=positions, position_embeddings=rotary
            )
        return route.extras["final_norm"](hidden)


def rotary_families() -> tuple[RotaryFamily, ...]:
    """The checkpoints this layout serves, each named by its ``model_type``."""
    return (
        RotaryFamily("llama", "Llama"),  # Llama 2 and 3, and checkpoints that load as Llama
        RotaryFamily("mistral", "Mistral"),
        RotaryFamily("qwen2", "Qwen2"),
        RotaryFamily("qwen3", "Qwen3"),
        RotaryFamily("phi3", "Phi3", ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    )

"""BERT: post-norm encoder layers, absolute positions already inside the cached states."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn
from transformers import AutoModel, PretrainedConfig
from transformers.models.bert.modeling_bert import BertLayer

from .base import Family, LateRoute, additive_mask


class BertFamily(Family):
    """BERT-style encoders: no final norm, so the route is the last k layers alone."""

    name = "bert"
    model_types = ("bert",)
    stack = "encoder.layer."
    lora_targets = ("query", "key", "value", "dense")
    layer_class: ClassVar[type[nn.Module]] = BertLayer

    def load_model(self, path: Path, *, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
        # AutoModel maps a task checkpoint (BertFor...) to the bare encoder, dropping its head.
        return AutoModel.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.encoder.layer

    def build_layer(self, config: PretrainedConfig, index: int) -> nn.Module:
        return self.layer_class(config, layer_idx=index)

    def run(self, route: LateRoute, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        mask = additive_mask(attention_mask, hidden.dtype)
        for layer in route.layers:
            hidden = layer(hidden, mask)
        return hidden

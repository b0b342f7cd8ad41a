"""T5's encoder stack: pre-norm blocks, a relative position bias shared from block 0, and a
final RMS norm. Its activations overflow float16, so caches default to bfloat16."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig, T5EncoderModel
from transformers.models.t5.modeling_t5 import T5Attention, T5Block, T5LayerNorm

from .base import Family, LateRoute, additive_mask


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
    name = "t5"
    model_types = ("t5",)
    stack = "encoder.block."
    default_dtype = "bfloat16"
    lora_targets = ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo")
    uses_token_type_ids = False
    outside_backbone = ("decoder.", "lm_head.")  # the encoder alone is the cached backbone
    _bias_tensor = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias."

    def route_config(self, config: PretrainedConfig) -> PretrainedConfig:
        config = super().route_config(config)
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
        mask = additive_mask(attention_mask, hidden.dtype)
        for block in route.layers:
            hidden = block(hidden, attention_mask=mask, position_bias=bias)[0]
        return route.extras["final_dropout"](route.extras["final_norm"](hidden))

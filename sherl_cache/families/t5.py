"""T5's encoder stack: pre-norm blocks, a relative position bias shared from block 0, and a
final RMS norm. Its activations overflow float16, so caches default to bfloat16."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig, T5EncoderModel
from transformers.models.t5.modeling_t5 import T5Attention, T5Block, T5LayerNorm

from ..errors import ConfigError
from . import t5_seq2seq
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
    routes = ("encoder", "seq2seq")
    gated_init_std = 0.01  # MTSAdapter's linears in the T5 reference: N(0, 0.01), bias 0
    default_fusion_variant = "gated"  # the T5 reference's MTSAdapter, no dropout inside
    default_fusion_dropout = 0.0

    def default_route(self, config: PretrainedConfig) -> str:
        # The paper's route wherever the checkpoint has the decoder and LM head it needs.
        return "seq2seq" if t5_seq2seq.has_decoder(config) else "encoder"

    def check_route(self, route: str, config: PretrainedConfig) -> None:
        super().check_route(route, config)
        if route == "seq2seq" and not t5_seq2seq.has_decoder(config):
            raise ConfigError(
                "--route seq2seq needs a T5ForConditionalGeneration checkpoint (decoder and LM "
                f"head); this one is {', '.join(config.architectures or ['unknown'])}: use "
                "--route encoder"
            )

    def load_route_model(
        self, path: Path, route: str, *, dtype: torch.dtype, trust_remote_code: bool
    ) -> nn.Module:
        if route == "seq2seq":
            return t5_seq2seq.T5Seq2SeqBackbone.load(
                path, dtype=dtype, trust_remote_code=trust_remote_code
            )
        return super().load_route_model(
            path, route, dtype=dtype, trust_remote_code=trust_remote_code
        )

    def seq2seq_taps(self, num_layers: int, num_decoder_layers: int) -> tuple[tuple[int, ...], ...]:
        return t5_seq2seq.encoder_taps(num_layers), t5_seq2seq.decoder_taps(num_decoder_layers)

    def build_seq2seq_route(self, config: PretrainedConfig) -> nn.Module:
        return t5_seq2seq.T5DecoderRoute(config)

    def seq2seq_route_tensors(self, config: PretrainedConfig) -> dict[str, str]:
        return t5_seq2seq.T5DecoderRoute.checkpoint_names(config)

    def side_norm(self, config: PretrainedConfig) -> nn.Module:
        return t5_seq2seq.side_norm(config)

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

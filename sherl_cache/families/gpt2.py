"""GPT-2: pre-norm blocks with learned absolute positions, which the embeddings add, so they
are already inside the cached states; the route is the last k blocks and the final LayerNorm."""

from __future__ import annotations

from torch import Tensor, nn
from transformers import PretrainedConfig
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

from .base import LateRoute
from .decoder import CausalFamily, causal_mask


class GPT2Family(CausalFamily):
    name = "gpt2"
    model_types = ("gpt2",)
    stack = "h."
    lora_targets = ("c_attn", "c_proj", "c_fc")
    lora_fan_in_fan_out = True  # transformers' Conv1D keeps weights as (in, out)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.h

    def build_layer(self, config: PretrainedConfig, index: int) -> nn.Module:
        return GPT2Block(config, layer_idx=index)

    def build_extras(self, config: PretrainedConfig) -> dict[str, nn.Module]:
        return {"final_norm": nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)}

    def extra_tensors(self, config: PretrainedConfig) -> dict[str, str]:
        return {"ln_f.": "extras.final_norm."}

    def run(self, route: LateRoute, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        mask = causal_mask(attention_mask, hidden.dtype)
        for block in route.layers:
            hidden = block(hidden, None, mask)
        return route.extras["final_norm"](hidden)

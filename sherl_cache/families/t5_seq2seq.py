"""T5 as the SHERL paper runs it on GLUE: text to text, a fusion on each side, the last decoder
block as the late route (the reference: ``Ladder-Side-Tuning/seq2seq`` in Paranioar/SHERL).

Encoder side: an MTSA fuses the embedding output and the outputs of the reference's encoder
blocks, the last block included, so the encoder has no late layer; a fresh RMS norm follows.
Decoder side: a second MTSA fuses the decoder's embedding output and its blocks below the last;
its result is the input of the last decoder block, which stays frozen and cross-attends to the
fused encoder output. A fresh RMS norm (in place of the decoder's final norm) and the frozen LM
head end the route.

Stage one therefore needs two things the encoder route does not: the *raw* output of the last
encoder block (transformers' last hidden state is after the final norm) and, per example, the
decoder's states with each candidate target teacher-forced while the frozen decoder
cross-attends to the frozen encoder. ``T5Seq2SeqBackbone`` computes both; ``T5DecoderRoute``
is the frozen last block, its position bias and the LM head, read from the checkpoint alone.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig, T5ForConditionalGeneration
from transformers.models.t5.modeling_t5 import T5Attention, T5Block, T5LayerNorm

from .base import ATTN_IMPLEMENTATION, additive_mask

__all__ = [
    "T5DecoderRoute",
    "T5Seq2SeqBackbone",
    "decoder_taps",
    "encoder_taps",
    "has_decoder",
    "reference_blocks",
    "side_norm",
]


def reference_blocks(num_layers: int) -> tuple[int, ...]:
    """The blocks whose outputs the reference's MTSA reads, for a stack of ``num_layers``.

    The reference scripts list them for two depths: t5-base (12) ``1,2,3,5,6,7,9,10,11`` and
    t5-large (24) ``1,3,5,...,21,22,23``; the same rules (every block but each fourth up to 12
    layers, every odd block plus the two last beyond) give a choice for any other depth. The
    last block is always among them.
    """
    if num_layers <= 12:
        blocks = {b for b in range(1, num_layers) if b % 4}
    else:
        blocks = {*range(1, num_layers, 2), num_layers - 2}
    return tuple(sorted(blocks | {num_layers - 1}))


def encoder_taps(num_layers: int) -> tuple[int, ...]:
    """Hidden-state indices of the encoder MTSA: the embedding output and ``block + 1`` of each
    reference block. The last, ``L``, is the raw output of the last block (guide and last
    feature of the encoder MTSA), not transformers' normed last hidden state."""
    return (0, *(b + 1 for b in reference_blocks(num_layers)))


def decoder_taps(num_layers: int) -> tuple[int, ...]:
    """Hidden-state indices of the decoder MTSA: the reference blocks below the last one (its
    input, index ``L - 1``, is the MTSA's last feature and always stored besides)."""
    return (0, *(b + 1 for b in reference_blocks(num_layers) if b < num_layers - 1))


def has_decoder(config: PretrainedConfig) -> bool:
    """Whether a T5 checkpoint holds the decoder and LM head the seq2seq route needs."""
    return any(a.endswith("ForConditionalGeneration") for a in config.architectures or ())


def side_norm(config: PretrainedConfig) -> nn.Module:
    """A fresh trainable RMS norm as T5 builds them (weights 1, variance in float32)."""
    return T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)


class T5Seq2SeqBackbone(nn.Module):
    """The frozen T5ForConditionalGeneration as stage one reads it.

    Called like a headless model (``input_ids``, ``attention_mask``, ``output_hidden_states``),
    it returns the encoder's states with index L replaced by the last block's raw output, so
    extraction's unit engine stores the encoder side unchanged. ``decoder_states`` runs the
    decoder with teacher forcing.
    """

    def __init__(self, model: T5ForConditionalGeneration) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @classmethod
    def load(
        cls, path: Path | str, *, dtype: torch.dtype, trust_remote_code: bool = False
    ) -> T5Seq2SeqBackbone:
        model = T5ForConditionalGeneration.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code
        )
        return cls(model)

    def encoder_states(
        self, input_ids: Tensor, attention_mask: Tensor
    ) -> tuple[tuple[Tensor, ...], Tensor]:
        """(states 0..L with L the raw last-block output, the normed encoder output the
        frozen decoder cross-attends to)."""
        raw: list[Tensor] = []
        last = self.model.encoder.block[-1]
        handle = last.register_forward_hook(lambda _m, _a, out: raw.append(out[0]))
        try:
            out = self.model.encoder(
                input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True
            )
        finally:
            handle.remove()
        return (*out.hidden_states[:-1], raw[-1]), out.last_hidden_state

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, output_hidden_states: bool = True
    ) -> SimpleNamespace:
        # output_hidden_states is accepted (and always true) so extraction's unit engine and
        # verify call this model exactly like a headless one.
        states, _ = self.encoder_states(input_ids, attention_mask)
        return SimpleNamespace(hidden_states=states)

    def decoder_states(
        self,
        encoder_output: Tensor,
        attention_mask: Tensor,
        decoder_input_ids: Tensor,
        decoder_attention_mask: Tensor,
    ) -> tuple[Tensor, ...]:
        """The decoder's ``hidden_states`` (0..L, the last after its final norm) for teacher-
        forced ``decoder_input_ids``, cross-attending to ``encoder_output``."""
        out = self.model.decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            encoder_hidden_states=encoder_output,
            encoder_attention_mask=attention_mask,
            output_hidden_states=True,
            use_cache=False,
        )
        return tuple(out.hidden_states)


class _DecoderPositionBias(nn.Module):
    """Decoder block 0's relative-position table alone (causal buckets), shared with the last
    block as T5 shares it with every later block."""

    _relative_position_bucket = staticmethod(T5Attention._relative_position_bucket)
    compute_bias = T5Attention.compute_bias

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.is_decoder = True
        self.relative_attention_num_buckets = config.relative_attention_num_buckets
        self.relative_attention_max_distance = config.relative_attention_max_distance
        self.relative_attention_bias = nn.Embedding(
            config.relative_attention_num_buckets, config.num_heads
        )


def route_config(config: PretrainedConfig) -> PretrainedConfig:
    """A decoder copy of a T5 config set to the kernel the additive masks are built for."""
    config = copy.deepcopy(config)
    config.is_decoder = True
    config.use_cache = False
    config._attn_implementation = ATTN_IMPLEMENTATION
    return config


class T5DecoderRoute(nn.Module):
    """The frozen end of the seq2seq route: the last decoder block (its self-attention bias
    rebuilt from block 0) and the LM head. ``forward`` gives the block's raw output; the
    model applies its own fresh norm, then ``logits``."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.config = route_config(config)
        layers = self.config.num_decoder_layers
        self.block = T5Block(self.config, has_relative_attention_bias=False, layer_idx=layers - 1)
        self.position_bias = _DecoderPositionBias(self.config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        scaled = getattr(config, "scale_decoder_outputs", config.tie_word_embeddings)
        self.output_scale = config.d_model**-0.5 if scaled else 1.0

    @staticmethod
    def checkpoint_names(config: PretrainedConfig) -> dict[str, str]:
        """Checkpoint name prefix -> route name prefix of every tensor the route needs (the
        LM head is the shared embedding where the checkpoint ties them)."""
        last = config.num_decoder_layers - 1
        bias = "decoder.block.0.layer.0.SelfAttention.relative_attention_bias."
        head = "shared." if config.tie_word_embeddings else "lm_head."
        return {
            f"decoder.block.{last}.": "block.",
            bias: "position_bias.relative_attention_bias.",
            head: "lm_head.",
        }

    def forward(
        self, hidden: Tensor, mask: Tensor, encoder_hidden: Tensor, encoder_mask: Tensor
    ) -> Tensor:
        """hidden (N, T, d) the fused input of the last block, mask (N, T) its real tokens;
        encoder_hidden (N, S, d) what it cross-attends to, encoder_mask (N, S)."""
        length = hidden.shape[1]
        bias = self.position_bias.compute_bias(length, length, device=hidden.device)
        bias = bias.to(hidden.dtype)
        causal = torch.ones(length, length, dtype=torch.bool, device=hidden.device).tril()
        keep = causal[None, None] & mask[:, None, None, :].bool()
        self_mask = (~keep).to(hidden.dtype) * torch.finfo(hidden.dtype).min
        cross_mask = additive_mask(encoder_mask, hidden.dtype)
        out = self.block(
            hidden,
            attention_mask=self_mask,
            position_bias=bias,
            encoder_hidden_states=encoder_hidden,
            encoder_attention_mask=cross_mask,
        )
        return out[0]

    def logits(self, normed: Tensor) -> Tensor:
        return self.lm_head(normed * self.output_scale)

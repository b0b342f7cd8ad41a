"""The interface every backbone family implements, and the late route built from it.

SHERL caches a frozen backbone's hidden states and trains on top of them, so for each
architecture the tool must know how to load it, feed it text, find its layer stack, and rebuild
its last k layers on their own so that they reproduce exactly what the full model computes from
hidden state L-k. All of that lives in one ``Family`` subclass per architecture; nothing outside
this package branches on a family's name. Layers come from transformers' own classes so the
maths cannot drift from the reference model.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig

from ..errors import ConfigError

# One attention kernel for every rebuilt layer, so the additive float mask below always applies.
ATTN_IMPLEMENTATION = "sdpa"
# Files that identify a tokenizer's vocabulary (hashed into the cache manifest).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "spiece.model", "vocab.json", "merges.txt")


class Family(ABC):
    """What one backbone family needs: how to load it, feed it, and run its late layers."""

    name: ClassVar[str]
    # ``config.model_type`` values this family handles.
    model_types: ClassVar[tuple[str, ...]]
    # Checkpoint path of the layer list (after any base-model prefix), e.g. "encoder.layer.".
    stack: ClassVar[str]
    # Storage dtype when the user names none (float16 overflows some families' activations).
    default_dtype: ClassVar[str] = "float16"
    default_pool: ClassVar[str] = "mean"
    # Module names PEFT's LoRA adapts in the late layers (attention and feed-forward).
    lora_targets: ClassVar[tuple[str, ...]]
    # Whether those modules store their weight as (in, out), like GPT-2's Conv1D.
    lora_fan_in_fan_out: ClassVar[bool] = False
    # Whether the backbone's forward embeds segment ids (BERT-style sentence pairs).
    uses_token_type_ids: ClassVar[bool] = True
    tokenizer_files: ClassVar[tuple[str, ...]] = TOKENIZER_FILES
    # Checkpoint tensor prefixes that are not part of the cached backbone (a seq2seq decoder).
    outside_backbone: ClassVar[tuple[str, ...]] = ()
    # Causal attention: a token sees only those before it (first-token pooling is meaningless).
    causal: ClassVar[bool] = False
    # How stage two reads the backbone (``--route``): "encoder" (fusion, last k layers, a
    # pooled head) for every family; "seq2seq" (the SHERL paper's T5 route) where offered.
    routes: ClassVar[tuple[str, ...]] = ("encoder",)
    # Init std of every linear of a gated fusion (``--fusion-variant gated``), as the family's
    # reference builds it; None: torch's default initialisation.
    gated_init_std: ClassVar[float | None] = None
    # The fusion module of the family's SHERL reference when the user names none
    # (``--fusion-variant``, ``--fusion-dropout``).
    default_fusion_variant: ClassVar[str] = "linear"
    default_fusion_dropout: ClassVar[float] = 0.1

    # --- routes --------------------------------------------------------------------------
    def default_route(self, config: PretrainedConfig) -> str:
        """The route ``extract`` takes when ``--route`` is not given, for this checkpoint."""
        return "encoder"

    def check_route(self, route: str, config: PretrainedConfig) -> None:
        """Refuse a route this family or this checkpoint cannot take, naming the flag."""
        if route not in self.routes:
            raise ConfigError(
                f"--route {route} is not offered for {self.name} models; "
                f"choose {' or '.join(self.routes)}"
            )

    def load_route_model(
        self, path: Path, route: str, *, dtype: torch.dtype, trust_remote_code: bool
    ) -> nn.Module:
        """The frozen model extraction runs for ``route`` (the headless one for "encoder")."""
        return self.load_model(path, dtype=dtype, trust_remote_code=trust_remote_code)

    def seq2seq_taps(self, num_layers: int, num_decoder_layers: int) -> tuple[tuple[int, ...], ...]:
        """(encoder taps, decoder taps) of the seq2seq route; only seq2seq families have one."""
        raise ConfigError(f"--route seq2seq is not offered for {self.name} models")

    def build_seq2seq_route(self, config: PretrainedConfig) -> nn.Module:
        """The frozen late end of the seq2seq route (built on the current device)."""
        raise ConfigError(f"--route seq2seq is not offered for {self.name} models")

    def seq2seq_route_tensors(self, config: PretrainedConfig) -> dict[str, str]:
        """Checkpoint name prefix -> route name prefix of the seq2seq route's tensors."""
        raise ConfigError(f"--route seq2seq is not offered for {self.name} models")

    def side_norm(self, config: PretrainedConfig) -> nn.Module:
        """A fresh trainable norm of the family's kind, after a fusion (seq2seq route)."""
        raise ConfigError(f"--route seq2seq is not offered for {self.name} models")

    # --- the frozen backbone -------------------------------------------------------------
    @abstractmethod
    def load_model(self, path: Path, *, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
        """The headless model whose ``hidden_states`` are cached."""

    @abstractmethod
    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The transformer layer list of a model returned by ``load_model``."""

    def encode(
        self,
        tokenizer: Any,
        columns: Sequence[Sequence[str]],
        max_length: int | None,
        template: str | None = None,
    ) -> dict[str, list[list[int]]]:
        """Token ids of one or two text columns (``max_length=None``: no truncation).

        The tokenizer's own special tokens and pair template; segment ids only where the
        backbone reads them. Only decoder-only families take a ``template``.
        """
        self.prompt_template(template, len(columns))
        texts = [list(column) for column in columns]
        truncation = (
            {"truncation": False}
            if max_length is None
            else {
                "truncation": True,
                "max_length": max_length,
            }
        )
        encoded = tokenizer(*texts, add_special_tokens=True, verbose=False, **truncation)
        out = {"input_ids": encoded["input_ids"]}
        if self.uses_token_type_ids and encoded.get("token_type_ids") is not None:
            out["token_type_ids"] = encoded["token_type_ids"]
        return out

    def prompt_template(self, template: str | None, num_texts: int) -> str | None:
        """The template a cache records for ``num_texts`` texts per example: None for families
        whose tokenizer joins texts itself (and a ``--template`` is refused there)."""
        if template is not None:
            raise ConfigError(
                f"--template applies to decoder-only models; a {self.name} model joins two "
                "texts with its tokenizer's own pair format"
            )
        return None

    def pad_id(self, tokenizer: Any) -> int:
        """The id padding positions hold (masked out, so any valid id is exact)."""
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def default_taps(self, num_layers: int, k: int) -> tuple[int, ...]:
        """SHERL's tapped states for a depth: every state below the split for shallow models
        (the BERT route of the reference code), and for deep ones (T5-large's GLUE setting)
        every second state plus the two just below the split."""
        split = num_layers - k
        if split <= 12:
            return tuple(range(split + 1))
        return tuple(sorted(set(range(0, split + 1, 2)) | {split - 1, split}))

    # --- the late route ------------------------------------------------------------------
    def route_config(self, config: PretrainedConfig) -> PretrainedConfig:
        """A private copy set to the attention kernel the route's additive masks are built for."""
        config = copy.deepcopy(config)
        config._attn_implementation = ATTN_IMPLEMENTATION
        return config

    @abstractmethod
    def build_layer(self, config: PretrainedConfig, index: int) -> nn.Module:
        """One layer as the full model builds it at ``index`` (on whatever device is current)."""

    def build_extras(self, config: PretrainedConfig) -> dict[str, nn.Module]:
        """Modules besides the layers the route needs (final norm, position bias, ...)."""
        return {}

    def computed_extras(self, config: PretrainedConfig) -> dict[str, nn.Module]:
        """Modules the route computes from the config alone (rotary tables): they have no
        checkpoint tensors, so they are built after loading, never on the meta device."""
        return {}

    def extra_tensors(self, config: PretrainedConfig) -> dict[str, str]:
        """Checkpoint name prefix -> route name prefix, for the tensors of ``build_extras``."""
        return {}

    @abstractmethod
    def run(self, route: LateRoute, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """Apply the route's layers (and extras) the way the full model's forward does."""


class Seq2SeqBackbone(Protocol):
    """What a family's seq2seq model (``load_route_model(..., "seq2seq")``) offers stage one,
    prediction and the online reference: called like a headless model it gives the encoder's
    states as the route caches them."""

    def encoder_states(
        self, input_ids: Tensor, attention_mask: Tensor
    ) -> tuple[tuple[Tensor, ...], Tensor]:
        """(encoder states 0..L as the route taps them, the output the decoder reads)."""
        ...

    def decoder_states(
        self,
        encoder_output: Tensor,
        attention_mask: Tensor,
        decoder_input_ids: Tensor,
        decoder_attention_mask: Tensor,
    ) -> tuple[Tensor, ...]:
        """The decoder's hidden states 0..L for teacher-forced inputs."""
        ...


def teacher_forcing(
    targets: Sequence[Sequence[int]], start_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Decoder inputs for candidate targets (each ending with EOS), right-padded to one length:
    (decoder_input_ids (C, T): the start id then the target shifted right; target ids (C, T);
    mask (C, T) of real target tokens)."""
    width = max(len(t) for t in targets)
    inputs = torch.full((len(targets), width), start_id, dtype=torch.long)
    ids = torch.zeros((len(targets), width), dtype=torch.long)
    mask = torch.zeros((len(targets), width), dtype=torch.long)
    for row, target in enumerate(targets):
        n = len(target)
        ids[row, :n] = torch.tensor(target)
        inputs[row, 1:n] = torch.tensor(target[:-1])
        mask[row, :n] = 1
    return inputs, ids, mask


def additive_mask(attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, T) 1/0 mask -> (B, 1, 1, T) of 0 / dtype min, which both eager and sdpa add to scores."""
    keep = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - keep) * torch.finfo(dtype).min


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

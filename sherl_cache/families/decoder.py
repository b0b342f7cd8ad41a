"""Decoder-only LLMs: causal attention, and how one or two texts become one prompt.

What every causal family shares lives here: a text template with the tokenizer's BOS/EOS, a pad
id for tokenizers that have none, last-token pooling, and the additive mask that combines the
causal mask with padding (and a sliding window where the checkpoint uses one). Batches are
always right-padded, so each example's real tokens sit at positions 0..n-1 whatever its batch:
the cached states, the late route and the backbone in the loop all see the same positions.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoModel

from ..errors import ConfigError
from .base import Family

SINGLE_TEMPLATE = "{text_a}"
PAIR_TEMPLATE = "{text_a}\n{text_b}"


def check_template(template: str, num_texts: int) -> None:
    """A template names {text_a}, and {text_b} exactly when the task has two texts."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ConfigError(f"--template {template!r} is not a valid template ({exc})") from None
    wanted = {"text_a", "text_b"} if num_texts == 2 else {"text_a"}
    if names != wanted:
        fields = " and ".join("{" + name + "}" for name in sorted(wanted))
        raise ConfigError(
            f"--template {template!r} must contain {fields} (this task has {num_texts} text(s)) "
            "and no other {field}"
        )


def unescape(template: str) -> str:
    r"""``\n`` and ``\t`` typed on a command line mean a newline and a tab."""
    return template.replace("\\n", "\n").replace("\\t", "\t")


def causal_mask(attention_mask: Tensor, dtype: torch.dtype, window: int | None = None) -> Tensor:
    """(B, T) 1/0 mask -> (B, 1, T, T) additive mask: key j is visible from query i when j <= i,
    j is a real token and, with a sliding window, i - j < window."""
    length = attention_mask.shape[1]
    positions = torch.arange(length, device=attention_mask.device)
    visible = positions[None, :] <= positions[:, None]
    if window is not None:
        visible = visible & (positions[:, None] - positions[None, :] < window)
    visible = visible[None, None] & attention_mask[:, None, None, :].bool()
    return torch.zeros(visible.shape, dtype=dtype, device=attention_mask.device).masked_fill(
        ~visible, torch.finfo(dtype).min
    )


class CausalFamily(Family):
    """What decoder-only families share; subclasses say where the layers live and how they run."""

    causal = True
    default_dtype = "bfloat16"  # LLM activations have outliers beyond float16's range
    default_pool = "last"  # the only token that has seen the whole input
    uses_token_type_ids = False
    outside_backbone = ("lm_head.",)

    def load_model(self, path: Path, *, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
        # AutoModel maps a *ForCausalLM checkpoint to the bare decoder, dropping the LM head.
        return AutoModel.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)

    def encode(
        self,
        tokenizer: Any,
        columns: Sequence[Sequence[str]],
        max_length: int | None,
        template: str | None = None,
    ) -> dict[str, list[list[int]]]:
        """BOS + the template filled with the texts + EOS; truncation cuts the text, never EOS.

        The tokenizer's own special-token handling is switched off so that every tokenizer
        (with or without a post-processor that adds BOS) yields the same layout.
        """
        template = self.prompt_template(template, len(columns))
        keys = ("text_a", "text_b")[: len(columns)]
        rows = zip(*columns, strict=True)
        texts = [template.format(**dict(zip(keys, row, strict=True))) for row in rows]
        bodies = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
        eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        room = None if max_length is None else max(0, max_length - len(bos) - len(eos))
        return {"input_ids": [bos + list(body[:room]) + eos for body in bodies]}

    def prompt_template(self, template: str | None, num_texts: int) -> str:
        template = unescape(template) if template else self.default_template(num_texts)
        check_template(template, num_texts)
        return template

    def default_template(self, num_texts: int) -> str:
        return PAIR_TEMPLATE if num_texts == 2 else SINGLE_TEMPLATE

    def pad_id(self, tokenizer: Any) -> int:
        """LLM tokenizers often have no pad token, and some name one beyond the model's
        embeddings; padding is masked, so EOS, always a real row, serves (nothing is resized)."""
        for candidate in (tokenizer.eos_token_id, tokenizer.pad_token_id):
            if candidate is not None:
                return candidate
        return 0

    def window(self, config: Any, index: int) -> int | None:
        """The sliding attention window of layer ``index``, if the checkpoint uses one there."""
        window = getattr(config, "sliding_window", None)
        if not window:
            return None
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            return window if layer_types[index] == "sliding_attention" else None
        return window if getattr(config, "use_sliding_window", True) else None


def layer_masks(
    family: CausalFamily, config: Any, first: int, attention_mask: Tensor, dtype: torch.dtype
) -> list[Tensor]:
    """One additive mask per late layer, built once per distinct window."""
    built: dict[int | None, Tensor] = {}
    masks = []
    for index in range(first, config.num_hidden_layers):
        window = family.window(config, index)
        if window not in built:
            built[window] = causal_mask(attention_mask, dtype, window)
        masks.append(built[window])
    return masks

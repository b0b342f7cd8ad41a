"""SHERL's anti-redundancy cross-layer fusion (MTSA), the trainable half of the method.

The frozen backbone runs once (its tapped hidden states can be cached); this module condenses
them into one (B, T, d) tensor that the last pre-trained layers consume. The deepest tap is the
*guide*: every shallower tap is scored by its agreement with the guide and discounted by how
much it repeats the other shallow taps, so stacking near-identical layers does not let one
representation dominate the aggregate.

Mirrors the two fusion modules of the public SHERL code (github.com/Paranioar/SHERL):

- ``"linear"``: ``sherl_for_transformer`` in ``VSE-infty/lib/adapter_for_transformer.py`` (BERT).
  Per tap ``LayerNorm(Linear(d, h))``; output ``Dropout(LayerNorm(Linear(h, d)(ReLU(agg))))``.
- ``"gated"``: ``MTSAdapter`` in ``Ladder-Side-Tuning/.../t5/modeling_side_t5.py`` (T5).
  Per tap ``x = ReLU(fc1 t); (fc2 x + x) * sigmoid(fc3 x)``; output ``Linear(h, d)(ReLU(agg))``.

Both end with ``+ tanh(g / 0.1) * last_feature`` where ``g`` starts at 0, so training starts
from the fused path alone and learns how much of the frozen late-layer input to let back in.

Deliberate differences from the reference, none of which change results on real activations:

- A layer's redundancy counts itself as exactly 1 (the reference's diagonal ``cos(h_l, h_l)``
  is 1 for any non-zero vector), so redundancy is >= 1 and an all-zero projected feature cannot
  divide 0 by 0.
- The attention mask zeroes the layer weights of padded tokens (their aggregate is the guide
  alone); the reference ignores the mask. Valid tokens are unaffected: all maths is per token.
- Dropout sits on the fused branch before the gated residual for both variants. The T5
  reference has none inside the module; its caller applies dropout after a final norm. The
  seq2seq route builds the T5 reference's module: ``--fusion-variant gated``,
  ``--fusion-dropout 0`` and every linear N(0, 0.01) with zero bias (``init_std``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config.train import FUSION_INITS, FUSION_VARIANTS, FusionInit, FusionVariant
from ..errors import ConfigError
from .storage_linear import first_linear

__all__ = [
    "FUSION_VARIANTS",
    "FusionConfig",
    "FusionVariant",
    "GatedProjection",
    "LinearProjection",
    "MTSAFusion",
    "layer_redundancy",
]


# L1 normalisation eps of the T5 reference; the BERT one uses 1e-8, immaterial in practice.
_L1_EPS = 1e-6
# Floor on vector norms before cosine similarity, so zero vectors have cosine 0, not NaN.
_COS_EPS = 1e-6
# The BERT reference reuses BERT's LayerNorm eps for the output norm.
_OUT_NORM_EPS = 1e-12


def _check_int(value: object, flag: str, minimum: int) -> None:
    # bool is an int subclass; True taps is never what a user meant.
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{flag} must be an integer >= {minimum}, got {value!r}")


def _check_number(value: object, flag: str, bounds: str, within: Callable[[float], bool]) -> None:
    # ``within`` is False for NaN, so NaN is rejected too.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{flag} must be a number {bounds}, got {value!r}")
    if not within(value):
        raise ConfigError(f"{flag} must be {bounds}, got {value!r}")


@dataclass(frozen=True)
class FusionConfig:
    """Shape and regularisation of one fusion module, checked when built.

    Validating here rather than in ``MTSAFusion`` lets the CLI reject bad flags before any
    model or cache is loaded; each message names the flag the user has to change.
    """

    hidden_size: int
    """Width d of the backbone's hidden states (from the backbone config, not a flag)."""
    num_taps: int
    """Tapped layers including the guide (``--tap``); 1 means the guide alone."""
    reduction: int = 8
    """Bottleneck factor r: taps are projected to h = d // r (``--reduction``)."""
    dropout: float = 0.1
    """Dropout on the fused branch (``--fusion-dropout``)."""
    variant: FusionVariant = "linear"
    """Which reference module to follow (``--fusion-variant``)."""
    gate_temperature: float = 0.1
    """T in tanh(g / T): small T makes the zero-initialised gate open quickly."""
    init_std: float | None = None
    """Initialise every linear N(0, init_std) with zero bias, as the T5 reference does (0.01);
    None keeps torch's default initialisation (the BERT reference's)."""
    init: FusionInit = "reference"
    """Where training starts (``--fusion-init``). ``reference``: the gate is closed, so the
    late layers first see a fresh random projection of the taps. ``residual``: the gate is
    open and the fused branch's last scale is zero, so the model starts as the pre-trained
    network (the frozen input passes through unchanged) and the fusion learns a correction."""

    def __post_init__(self) -> None:
        _check_int(self.hidden_size, "hidden_size (from the backbone config)", 1)
        _check_int(self.num_taps, "--tap (number of tapped layers, guide included)", 1)
        _check_int(self.reduction, "--reduction", 1)
        if self.hidden_size // self.reduction < 1:
            raise ConfigError(
                f"--reduction {self.reduction} exceeds the hidden size {self.hidden_size}: "
                f"the fusion bottleneck would have 0 units; use --reduction <= {self.hidden_size}"
            )
        _check_number(self.dropout, "--fusion-dropout", "in [0, 1)", lambda v: 0.0 <= v < 1.0)
        if self.variant not in FUSION_VARIANTS:
            raise ConfigError(
                f"--fusion-variant must be one of {', '.join(FUSION_VARIANTS)}, "
                f"got {self.variant!r}"
            )
        _check_number(self.gate_temperature, "gate_temperature", "> 0", lambda v: v > 0.0)
        if self.init_std is not None:
            _check_number(self.init_std, "init_std", "> 0", lambda v: v > 0.0)
        if self.init not in FUSION_INITS:
            raise ConfigError(
                f"--fusion-init must be one of {', '.join(FUSION_INITS)}, got {self.init!r}"
            )

    @property
    def bottleneck_size(self) -> int:
        """h, the width every tap is projected to before fusion."""
        return self.hidden_size // self.reduction

    @property
    def num_shallow(self) -> int:
        """Taps that receive a weight; the guide is added unweighted."""
        return self.num_taps - 1


class LinearProjection(nn.Module):
    """BERT-variant tap projection: the LayerNorm puts taps of very different scale
    (embeddings vs late layers) on a common footing before they are compared."""

    def __init__(self, hidden_size: int, bottleneck_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, bottleneck_size)
        self.norm = nn.LayerNorm(bottleneck_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(first_linear(self.linear, x))


class GatedProjection(nn.Module):
    """T5-variant tap projection, as in the T5 reference: a residual bottleneck whose sigmoid
    gate can switch each unit off per token. Unlike the linear variant it has no norm."""

    def __init__(self, hidden_size: int, bottleneck_size: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, bottleneck_size)
        self.fc2 = nn.Linear(bottleneck_size, bottleneck_size)
        self.fc3 = nn.Linear(bottleneck_size, bottleneck_size)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(first_linear(self.fc1, x))
        return (self.fc2(x) + x) * torch.sigmoid(self.fc3(x))


def layer_redundancy(features: Tensor) -> Tensor:
    """How much each layer repeats the others: ``1 + sum_{j != l} ReLU(cos(f_l, f_j))``.

    ``features`` is (..., L, h), one row per layer; returns (..., L). Only positive similarity
    counts, so anti-correlated layers are not rewarded. The self term is fixed at 1 (equal to the
    reference's ``cos(f_l, f_l)`` for any non-zero row) which keeps the result >= 1: dividing by
    it is safe even for all-zero rows, whose cosine with everything is 0.
    """
    unit = F.normalize(features, dim=-1, eps=_COS_EPS)
    similarity = torch.relu(unit @ unit.transpose(-1, -2))
    num_layers = features.shape[-2]
    off_diagonal = ~torch.eye(num_layers, dtype=torch.bool, device=features.device)
    return 1.0 + (similarity * off_diagonal).sum(dim=-1)


class MTSAFusion(nn.Module):
    """Fuse tapped hidden states into the input of the first late pre-trained layer.

    Per token, with h_l the projected shallow taps and h_G the projected guide::

        score_l   = ReLU(w . (h_l * h_G)) / redundancy_l
        weight_l  = score_l / (sum_l |score_l| + 1e-6)
        aggregate = sum_l weight_l h_l + h_G
        result    = Dropout(Out(ReLU(aggregate))) + tanh(g / T) last_feature

    ``Out`` is Linear(h, d) then LayerNorm(d) for the linear variant, Linear(h, d) alone for
    the gated one. ``g`` starts at 0, so ``result`` initially ignores ``last_feature`` exactly.
    """

    def __init__(self, config: FusionConfig) -> None:
        super().__init__()
        self.config = config
        d, h = config.hidden_size, config.bottleneck_size
        projection = LinearProjection if config.variant == "linear" else GatedProjection
        self.projections = nn.ModuleList(projection(d, h) for _ in range(config.num_taps))
        self.scorer = nn.Linear(h, 1)
        self.out_proj = nn.Linear(h, d)
        self.out_norm: nn.Module = (
            nn.LayerNorm(d, eps=_OUT_NORM_EPS) if config.variant == "linear" else nn.Identity()
        )
        self.dropout = nn.Dropout(config.dropout)
        self.gate = nn.Parameter(torch.zeros(1))
        if config.init_std is not None:
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, mean=0.0, std=config.init_std)
                    nn.init.zeros_(module.bias)
        if config.init == "residual":
            self._start_residual()

    # tanh(10) rounds to 1 in float32: an open gate passes the frozen input exactly.
    _OPEN_GATE_LOGIT = 10.0

    def _start_residual(self) -> None:
        """Open the gate and zero the fused branch's last scale, so the first forward pass
        returns ``last_feature`` itself. The zeroed scale still receives gradient (the branch
        before it is not zero), so the branch grows from nothing instead of starting as noise
        of the same size as the pre-trained features."""
        with torch.no_grad():
            self.gate.fill_(self._OPEN_GATE_LOGIT * self.config.gate_temperature)
            last_scale = self.out_norm if isinstance(self.out_norm, nn.LayerNorm) else self.out_proj
            nn.init.zeros_(last_scale.weight)
            nn.init.zeros_(last_scale.bias)

    def gate_value(self) -> Tensor:
        """The current weight of ``last_feature`` in the result, tanh(g / T)."""
        return torch.tanh(self.gate / self.config.gate_temperature)

    def forward(
        self,
        taps: Sequence[Tensor],
        last_feature: Tensor,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """Fuse ``taps`` (shallow to deep, each (B, T, d)) into a (B, T, d) tensor.

        ``last_feature`` is the frozen input of the first late layer; ``attention_mask`` (B, T)
        marks real tokens with 1 and only affects padded positions. Taps and ``last_feature``
        may be float32 or a cache's float16/bfloat16: the maths is float32 either way (each
        tap's first linear keeps it in its storage dtype for backward: ``storage_linear``).
        """
        batch_shape = self._check_taps(taps, attention_mask)
        if tuple(last_feature.shape) != (*batch_shape, self.config.hidden_size):
            raise ValueError(
                f"last_feature has shape {tuple(last_feature.shape)}, expected "
                f"{(*batch_shape, self.config.hidden_size)} like the taps"
            )
        projected = self._project(taps)
        guide = projected[-1]
        aggregate = guide
        if self.config.num_shallow:
            shallow = torch.stack(projected[:-1], dim=-2)
            weights = self._weights(shallow, guide, attention_mask)
            aggregate = guide + (weights.unsqueeze(-2) @ shallow).squeeze(-2)
        fused = self.dropout(self.out_norm(self.out_proj(torch.relu(aggregate))))
        return fused + self.gate_value() * last_feature

    def layer_weights(self, taps: Sequence[Tensor], attention_mask: Tensor | None = None) -> Tensor:
        """The L1-normalised weights of the shallow taps, (B, T, num_taps - 1).

        Exposed so tests and diagnostics can see which layers the fusion relies on; forward
        does not call it, to avoid projecting twice.
        """
        self._check_taps(taps, attention_mask)
        projected = self._project(taps)
        if not self.config.num_shallow:
            return projected[-1].new_zeros((*projected[-1].shape[:-1], 0))
        return self._weights(torch.stack(projected[:-1], dim=-2), projected[-1], attention_mask)

    def _project(self, taps: Sequence[Tensor]) -> list[Tensor]:
        return [projection(tap) for projection, tap in zip(self.projections, taps, strict=True)]

    def _weights(self, shallow: Tensor, guide: Tensor, attention_mask: Tensor | None) -> Tensor:
        # shallow (B, T, L, h), guide (B, T, h) -> (B, T, L)
        alignment = self.scorer(shallow * guide.unsqueeze(-2)).squeeze(-1)
        scores = torch.relu(alignment) / layer_redundancy(shallow)
        weights = scores / (scores.abs().sum(dim=-1, keepdim=True) + _L1_EPS)
        if attention_mask is not None:
            weights = weights * attention_mask.unsqueeze(-1).to(weights.dtype)
        return weights

    def _check_taps(self, taps: Sequence[Tensor], attention_mask: Tensor | None) -> tuple[int, int]:
        # Turn shape slips (usually a cache built with other --tap / model settings) into a
        # message that says which input is wrong, instead of a matmul error deep inside.
        if len(taps) != self.config.num_taps:
            raise ConfigError(
                f"got {len(taps)} tapped layers but the fusion was built for "
                f"{self.config.num_taps} (--tap); the cache and the run must tap the same layers"
            )
        expected = (*taps[0].shape[:-1], self.config.hidden_size)
        if taps[0].dim() != 3:
            raise ValueError(f"taps must be (batch, tokens, hidden), got {tuple(taps[0].shape)}")
        for index, tap in enumerate(taps):
            if tuple(tap.shape) != expected:
                raise ValueError(
                    f"tap {index} has shape {tuple(tap.shape)}, expected {expected} "
                    f"(hidden size {self.config.hidden_size}, same batch and length as tap 0)"
                )
        batch_shape = (expected[0], expected[1])
        if attention_mask is not None and tuple(attention_mask.shape) != batch_shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected {batch_shape}"
            )
        return batch_shape

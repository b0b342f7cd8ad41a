"""The SHERL model: MTSA fusion of the tapped states, the last k pre-trained layers, a head.

The late layers are frozen, fully trained or adapted with LoRA (through PEFT, on the modules
the family names in ``lora_targets``); only what trains is saved in a run's checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..backbone.hub import backbone_parameter_count
from ..backbone.late import build_late_route
from ..config.train import Pool, TrainConfig, default_fusion_init
from ..data.tasks import Problem, TaskSpec
from ..errors import ConfigError
from ..families import Family, LateRoute, get_family
from ..store.cache import Cache
from .features import Batch
from .fusion import FusionConfig, MTSAFusion


class NoLateLayers(nn.Module):
    """``--late-layers 0``: the head reads the fused states themselves (a probe).

    The fusion's guide is then the backbone's last hidden state, which for families with a
    final norm already has it applied, so nothing follows."""

    def forward(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        return hidden


class SherlModel(nn.Module):
    """MTSA fusion -> last k pre-trained layers -> pooled task head."""

    def __init__(
        self,
        fusion: MTSAFusion,
        late: LateRoute | NoLateLayers,
        task: TaskSpec,
        pool: Pool,
        head_dropout: float,
        tap_dropout: float = 0.0,
    ):
        super().__init__()
        self.fusion, self.late, self.pool = fusion, late, pool
        hidden = fusion.config.hidden_size
        outputs = 1 if task.problem == Problem.REGRESSION else task.num_labels
        self.head = nn.Sequential(nn.Dropout(head_dropout), nn.Linear(hidden, outputs))
        self.tap_dropout = tap_dropout
        self.regression = task.problem == Problem.REGRESSION
        # The late route holds most of the compute; bf16 autocast there (CUDA) halves its
        # activations. Set by whoever places the model (``training.loop.place``).
        self.late_bf16 = False

    def forward(self, batch: Batch) -> Tensor:
        taps, last = self._perturbed(batch)
        fused = self.fusion(taps, last, batch.mask)
        with torch.autocast(fused.device.type, dtype=torch.bfloat16, enabled=self.late_bf16):
            states = self.late(fused, batch.mask)
        states = states.float()
        if self.pool == "first":
            pooled = states[:, 0]
        elif self.pool == "last":  # right-padded: the last real token is at length - 1
            last = batch.mask.sum(1).clamp(min=1) - 1
            pooled = states[torch.arange(len(states), device=states.device), last]
        else:  # masked mean: every real token counts, padding never does
            weights = batch.mask[..., None].to(states.dtype)
            pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        logits = self.head(pooled)
        return logits.squeeze(-1) if self.regression else logits

    def _perturbed(self, batch: Batch) -> tuple[list[Tensor], Tensor]:
        """The batch's states with ``--tap-dropout`` applied (training only). A state read
        twice (the split layer is usually a tap too) gets one mask, as online it would be one
        tensor."""
        if not (self.training and self.tap_dropout):
            return batch.taps, batch.last
        dropped: dict[int, Tensor] = {}

        def drop(state: Tensor) -> Tensor:
            if id(state) not in dropped:
                dropped[id(state)] = nn.functional.dropout(state, self.tap_dropout)
            return dropped[id(state)]

        return [drop(t) for t in batch.taps], drop(batch.last)

    def predictions(self, outputs: Tensor) -> Tensor:
        """What metrics and prediction files read from ``forward``'s outputs: the outputs
        themselves here; the seq2seq model maps its class scores to a regression's number."""
        return outputs

    def loss(self, outputs: Tensor, labels: Tensor) -> Tensor:
        if self.regression:
            return nn.functional.mse_loss(outputs, labels.float())
        return nn.functional.cross_entropy(outputs, labels.long())


def with_family_defaults(config: TrainConfig, family: Family) -> TrainConfig:
    """``config`` with the settings left to the family resolved (pool, fusion variant and
    dropout), as a run records them: the run then reads the same whatever later versions
    default to, and a sweep's resume compares like with like."""
    return replace(
        config,
        pool=config.pool or family.default_pool,
        fusion_variant=config.fusion_variant or family.default_fusion_variant,
        fusion_init=config.fusion_init or default_fusion_init(config.late_mode),
        fusion_dropout=(
            family.default_fusion_dropout
            if config.fusion_dropout is None
            else config.fusion_dropout
        ),
    )


def fusion_config(config: TrainConfig, family: Family, hidden_size: int, taps: int) -> FusionConfig:
    """The fusion ``config`` asks for, the family's reference module where it names none; a
    gated module initialised as the family's reference builds it (T5: N(0, 0.01))."""
    variant = config.fusion_variant or family.default_fusion_variant
    dropout = config.fusion_dropout
    return FusionConfig(
        hidden_size=hidden_size,
        num_taps=taps,
        reduction=config.reduction,
        dropout=family.default_fusion_dropout if dropout is None else dropout,
        variant=variant,  # type: ignore[arg-type]
        init_std=family.gated_init_std if variant == "gated" else None,
        init=config.fusion_init or default_fusion_init(config.late_mode),
    )


def build_model(
    config: TrainConfig,
    backbone: Cache | Mapping[str, Any],
    task: TaskSpec,
    taps: Sequence[int],
    model_path: str,
) -> SherlModel:
    """A freshly initialised SherlModel (seeded), late layers read from ``model_path``.

    ``backbone`` is the backbone identity as a cache manifest records it (``model``: family,
    hidden_size, ...); a Cache stands for its own. Taking the identity rather than a cache lets
    a run be rebuilt for prediction from its config.json alone.
    """
    identity = backbone.manifest["model"] if isinstance(backbone, Cache) else backbone
    if identity.get("route") == "seq2seq":  # the paper's T5 route (training/seq2seq.py)
        from .seq2seq import build_seq2seq_model

        seq2seq: Any = build_seq2seq_model(config, identity, task, taps, model_path)
        return seq2seq
    family = get_family(identity["family"])
    torch.manual_seed(config.seed)
    fusion = MTSAFusion(fusion_config(config, family, int(identity["hidden_size"]), len(taps)))
    pool = config.pool or family.default_pool  # no pool given: the family's
    if family.causal and pool == "first":
        raise ConfigError(
            "--pool first reads the first token, which in a decoder-only model has seen "
            "nothing else; use --pool last (its default) or mean"
        )
    late = (
        build_late_route(model_path, config.late_layers) if config.late_layers else NoLateLayers()
    )
    model = SherlModel(fusion, late, task, pool, config.head_dropout, config.tap_dropout)
    model.late.requires_grad_(config.late_mode == "full")
    if config.late_mode == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        present = {name.rsplit(".", 1)[-1] for name, _ in model.late.named_modules()}
        targets = [t for t in family.lora_targets if t in present]
        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            target_modules=targets,
            fan_in_fan_out=family.lora_fan_in_fan_out,
        )
        inject_adapter_in_model(lora, model.late)
        for name, param in model.late.named_parameters():
            param.requires_grad_("lora_" in name)
    if config.late_checkpointing:
        checkpoint_layers(model.late)
    return model


def checkpoint_layers(route: nn.Module) -> None:
    """Turn on transformers' own activation checkpointing in every layer of ``route`` that
    offers it (``GradientCheckpointingLayer``: every family's layers); a route with none (a
    probe, ``--late-layers 0``) is refused rather than silently left as it was.

    A checkpointed layer keeps only its inputs and recomputes the rest in the backward pass,
    with the forward's RNG state, so dropout masks, losses and gradients are unchanged.
    Non-reentrant checkpointing, so inputs may be keyword arguments and the frozen layers'
    input gradient still reaches the fusion.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in route.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ConfigError(
            "--late-checkpointing recomputes late layers, and this run has none "
            "(--late-layers 0); drop the flag"
        )
    for layer in layers:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def parameter_counts(model: SherlModel, model_path: str, family: Family) -> tuple[int, int]:
    """(trainable, total): total is the whole backbone plus what SHERL adds to it (fusion,
    head, LoRA), so the trainable share compares with fine-tuning the backbone."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    added = sum(
        p.numel() for n, p in model.named_parameters() if not n.startswith("late.") or "lora_" in n
    )
    # The seq2seq route reads the whole checkpoint (decoder and LM head included).
    whole = bool(getattr(model, "uses_whole_checkpoint", False))
    backbone = backbone_parameter_count(model_path, family, whole=whole)
    return int(trainable), int(backbone + added)

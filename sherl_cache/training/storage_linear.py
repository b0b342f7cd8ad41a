"""A tap's first linear layer, applied to the tap in its storage dtype.

Why: on a float16/bfloat16 cache the taps are the largest tensors of a training step (one
(B, T, d) tensor per tap), and a plain ``linear(tap.float())`` keeps the float32 copy alive
until backward, because autograd saves a linear's input for its weight gradient. Saving the
tap itself instead, in its storage dtype, halves those bytes, and since float16/bfloat16 ->
float32 is exact, recasting it in backward gives the very tensor the float32 path would have
saved: forward and backward are bitwise identical to ``F.linear(tap.float(), weight, bias)``
(the backward uses the same matrix products, in the same layouts, as autograd's own for that
call). Only one tap's float32 copy exists at a time, in forward and in backward.

Float32 taps (float32 and lossy caches, online features) take the plain path: nothing to save.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["STORAGE_FLOATS", "StorageLinear", "first_linear"]

# Dtypes a cache can deliver taps in without decoding them (every value exact in float32).
STORAGE_FLOATS = (torch.float16, torch.bfloat16)


class StorageLinear(torch.autograd.Function):
    """``F.linear(tap.float(), weight, bias)`` that saves ``tap`` in its own dtype."""

    @staticmethod
    def forward(tap: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        return F.linear(tap.float(), weight, bias)

    @staticmethod
    def setup_context(
        ctx: Any, inputs: tuple[Tensor, Tensor, Tensor | None], output: Tensor
    ) -> None:
        tap, weight, bias = inputs
        ctx.save_for_backward(tap, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # type: ignore[override]
        tap, weight = ctx.saved_tensors
        # As autograd differentiates F.linear on a contiguous float32 input: the input viewed
        # as (N, d), grad as (N, h); addmm's gradients in the layouts it uses for them.
        grad2d = grad.reshape(-1, grad.shape[-1])
        grad_tap = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_tap = grad2d.mm(weight).reshape(tap.shape).to(tap.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = grad2d.t().mm(tap.reshape(-1, tap.shape[-1]).float())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad2d.sum(0)
        return grad_tap, grad_weight, grad_bias


def first_linear(layer: nn.Linear, tap: Tensor) -> Tensor:
    """``layer(tap)`` in float32, the tap saved for backward in its storage dtype when it has
    one; under autocast (where the input's dtype is autocast's choice) the plain layer."""
    if tap.dtype not in STORAGE_FLOATS:
        return layer(tap)
    if torch.is_autocast_enabled(tap.device.type):
        return layer(tap.float())
    return StorageLinear.apply(tap, layer.weight, layer.bias)

"""Autograd helpers shared by the solvers: gradients that must not be differentiated again."""

from __future__ import annotations

import torch
from torch import Tensor


class _RaiseIfDifferentiated(torch.autograd.Function):
    """Identity on a gradient ``g``, tied to ``inputs``; differentiating it again raises ``message``."""

    @staticmethod
    def forward(ctx, message: str, g: Tensor, *inputs: Tensor) -> Tensor:
        ctx.message = message
        return g.view_as(g)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(ctx.message)


def first_order_only(grads: tuple, inputs, message: str) -> tuple:
    """Gradients returned by a backward that has no graph of its own: when that backward runs with
    ``create_graph=True``, tie each to ``inputs`` through a node that raises ``message`` when differentiated,
    so that a second derivative fails loudly instead of silently missing the backward's part."""
    if not torch.is_grad_enabled():
        return grads
    ties = [x for x in inputs if isinstance(x, Tensor) and x.requires_grad]
    if not ties:
        return grads
    return tuple(g if not isinstance(g, Tensor) else _RaiseIfDifferentiated.apply(message, g, *ties) for g in grads)


class FirstOrderOnly(torch.autograd.Function):
    """Identity on ``x``, whose gradient may not be differentiated again through ``inputs`` (raises)."""

    @staticmethod
    def forward(ctx, message: str, x: Tensor, *inputs: Tensor) -> Tensor:
        ctx.message = message
        ctx.save_for_backward(*inputs)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        saved = ctx.saved_tensors  # (once: checkpointing allows one unpack)
        # no cotangent reaches x (e.g. the loss uses only samples without an event): the zero gradient's own
        # derivative is zero, exactly, so it need not raise
        if torch.is_grad_enabled() and bool((g != 0).any()):
            (g,) = first_order_only((g,), (g, *saved), ctx.message)
        return (None, g) + (None,) * len(saved)

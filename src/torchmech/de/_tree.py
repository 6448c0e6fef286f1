"""Small helpers for tensors and (nested tuple) trees of tensors used across torchmech.de."""

from __future__ import annotations

import torch
from torch import Tensor


def tree_map(fn, *trees):
    """Apply ``fn`` leafwise over nested tuples/lists of tensors."""
    first = trees[0]
    if isinstance(first, (tuple, list)):
        return type(first)(tree_map(fn, *parts) for parts in zip(*trees))
    return fn(*trees)


def tree_leaves(tree) -> list:
    """Flatten nested tuples/lists/dicts into a list of leaves."""
    if isinstance(tree, dict):
        return [leaf for key in sorted(tree, key=str) for leaf in tree_leaves(tree[key])]
    if isinstance(tree, (tuple, list)):
        return [leaf for part in tree for leaf in tree_leaves(part)]
    return [tree]


def bcast(x: Tensor, like: Tensor) -> Tensor:
    """Reshape per-sample ``x`` (B,) to broadcast against ``like`` (B, ...)."""
    return x.reshape(x.shape + (1,) * (like.dim() - x.dim()))


def where(mask: Tensor, a, b):
    """``torch.where`` with a per-sample ``(B,)`` mask over trees of batch-first tensors."""
    return tree_map(lambda x, y: torch.where(bcast(mask, x), x, y), a, b)


def all_finite(tree) -> Tensor:
    """Per-sample finiteness of every leaf, shape (B,)."""
    out = None
    for leaf in tree_leaves(tree):
        fin = torch.isfinite(leaf).reshape(leaf.shape[0], -1).all(dim=1)
        out = fin if out is None else out & fin
    return out


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
        (g,) = first_order_only((g,), (g, *saved), ctx.message)
        return (None, g) + (None,) * len(saved)

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


def any_requires_grad(tree) -> bool:
    """Whether any tensor leaf of ``tree`` requires grad (non-tensor leaves, None included, do not)."""
    return any(isinstance(x, Tensor) and x.requires_grad for x in tree_leaves(tree))


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

